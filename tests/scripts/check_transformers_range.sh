#!/usr/bin/env bash
# Run the --optim dualadam registration and Trainer tests against each given transformers release, each in a
# throwaway venv, to check the range declared in pyproject.toml (SUPPORTED_TRANSFORMERS in
# dualadam_hf/integrations/transformers.py). Needs PyPI access.
#   tests/scripts/check_transformers_range.sh 5.0.0 5.12.1 5.24.0
set -euo pipefail
repo="$(cd "$(dirname "$0")/../.." && pwd)"
torch_version="$(python -c 'import torch; print(torch.__version__.split("+")[0])' 2>/dev/null || echo 2.13.0)"
for version in "$@"; do
    venv="$(mktemp -d)/venv"
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q "torch==$torch_version" "transformers==$version" accelerate pytest pyyaml
    "$venv/bin/pip" install -q --no-deps -e "$repo"
    echo "== transformers $version"
    (cd "$repo" && "$venv/bin/python" -m pytest -q -m "not gpu" tests/test_tiny.py tests/test_integration_register.py \
        tests/test_integration_optim_args.py tests/test_integration_trainer.py)
    rm -rf "$(dirname "$venv")"
done
