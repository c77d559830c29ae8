#!/usr/bin/env bash
# By-hand check (not run in CI) of the Hugging Face versions dualadam-hf claims to support: builds two venvs,
#   oldest: the oldest supported releases (transformers 5.0, TRL 1.0, PEFT 0.18, accelerate 1.5, datasets 4.7)
#   newest: the latest published release of each
# each on the same CPU torch, installs the package into each and runs the HF-integration tests against it.
# Needs PyPI. Takes about 10-20 minutes on 2 cores; prints one summary line per stack at the end.
#
#   scripts/check_hf_stack.sh                 # both stacks, slow tests included (the CLI tests are all slow)
#   scripts/check_hf_stack.sh newest          # one stack
#   FAST=1 scripts/check_hf_stack.sh          # skip the slow tests (pyproject's default markers)
#   STACK_DIR=/tmp/stacks scripts/...         # keep the venvs and logs there, and reuse them next time
#   KEEP=1 scripts/check_hf_stack.sh          # keep the temporary folder
#
# Why pyproject's floors (core and experiments extra) are what they are:
#   datasets 4.7.0: TRL 1.0.0 requires datasets>=4.7.0, so nothing older installs next to trl>=1.0.
#   peft 0.18.0: with PEFT 0.15 the Trainer and PEFT tests pass, but `trl sft --use_peft` fails, because
#   TRL 1.0's get_peft_config passes LoraConfig(target_parameters=...), which PEFT only has from 0.17:
#     TypeError: LoraConfig.__init__() got an unexpected keyword argument 'target_parameters'
#   and PEFT 0.16.x/0.17.x cannot be imported with transformers 5 at all:
#     ImportError: cannot import name 'HybridCache' from 'transformers'
#   Set OLDEST_PEFT=0.15.0 (or 0.17.0) to see it.
set -uo pipefail

repo="$(cd "$(dirname "$0")/.." && pwd)"
torch_version="${TORCH_VERSION:-2.13.0}"
stack_dir="${STACK_DIR:-$(mktemp -d /tmp/dualadam-hf-stacks.XXXXXX)}"
python="${PYTHON:-python3}"
mkdir -p "$stack_dir"

declare -A STACKS=(
    [oldest]="transformers==5.0.0 trl==1.0.0 peft==${OLDEST_PEFT:-0.18.0} accelerate==1.5.0 datasets==4.7.0"
    [newest]="transformers trl peft accelerate datasets"
)
TESTS=(
    tests/test_integration_register.py tests/test_hook_warnings.py tests/test_integration_trainer.py
    tests/test_integration_optim_args.py tests/test_integration_cli.py tests/test_integration_peft.py
)
if [[ "${FAST:-0}" == 1 ]]; then
    markers=()  # pyproject's addopts: not slow, not multiprocess, not gpu
else
    markers=(-m "not multiprocess and not gpu")
fi

names=("$@")
[[ ${#names[@]} -eq 0 ]] && names=(oldest newest)

export HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
unset DUALADAM_HF_NO_AUTOREGISTER

install_stack() {  # venv name specs
    local venv="$1" name="$2" specs="$3" upgrade=()
    [[ "$name" == newest ]] && upgrade=(--upgrade)
    if [[ ! -x "$venv/bin/python" ]]; then
        # torch first, pinned: a bare `torch` requirement could pull a multi-GB CUDA build.
        "$python" -m venv "$venv" && "$venv/bin/pip" install -q "torch==$torch_version" || return 1
    fi
    # shellcheck disable=SC2086
    # The stack, the rest of the experiments extra (unpinned) and the test tools.
    "$venv/bin/pip" install -q "${upgrade[@]}" "torch==$torch_version" $specs matplotlib scipy pyyaml pytest \
        pytest-timeout || return 1
    # --no-deps: test exactly the stack above, whatever pyproject's bounds say; `pip check` reports a clash.
    "$venv/bin/pip" install -q --no-deps --force-reinstall "$repo"
}

declare -A RESULT
status=0
for name in "${names[@]}"; do
    specs="${STACKS[$name]:?unknown stack $name (oldest or newest)}"
    venv="$stack_dir/$name"
    log="$stack_dir/$name.log"
    echo "== $name: $specs (venv $venv, log $log)"
    start=$(date +%s)
    install_stack "$venv" "$name" "$specs" >"$log" 2>&1 \
        || { echo "   install failed, see $log"; tail -n 20 "$log"; RESULT[$name]="install failed"; status=1; continue; }
    install_s=$(( $(date +%s) - start ))
    versions="$("$venv/bin/python" - <<'EOF'
import importlib.metadata as m
print(" ".join(f"{p}=={m.version(p)}" for p in
               ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "huggingface_hub", "dualadam-hf")))
EOF
)"
    echo "   $versions"
    "$venv/bin/pip" check 2>&1 | sed 's/^/   pip check: /'
    start=$(date +%s)
    (cd "$repo" && "$venv/bin/python" -m pytest "${TESTS[@]}" -q -p no:cacheprovider "${markers[@]}" -rfE) \
        >>"$log" 2>&1
    rc=$?
    [[ $rc -ne 0 ]] && status=1
    test_s=$(( $(date +%s) - start ))
    summary="$(grep -E '^(=+ )?[0-9]+ (passed|failed|error)|(passed|failed|error).* in [0-9.]+s' "$log" | tail -n 1)"
    grep -E '^(FAILED|ERROR) ' "$log" | sed 's/^/   /'
    RESULT[$name]="rc=$rc ${summary//=/} (install ${install_s}s, tests ${test_s}s) $versions"
done

echo
echo "== summary ($(date -u +%Y-%m-%d), python $("$python" -c 'import platform; print(platform.python_version())'))"
for name in "${names[@]}"; do
    echo "$name: ${RESULT[$name]}"
done
if [[ "${KEEP:-0}" != 1 && -z "${STACK_DIR:-}" ]]; then
    rm -rf "$stack_dir"
else
    echo "venvs and logs kept in $stack_dir"
fi
exit $status
