#!/usr/bin/env bash
# The suite's pilot (docs/study/suite.md): for each candidate task, SmolLM2-135M-Instruct's exact match on 100
# validation problems before training (one step at learning rate 0) and after the suite recipe's 48 LoRA steps of
# AdamW at 3e-4 (the rate study v2 chose), one seed. Reads validation splits only. Runs go to outputs/pilot/; a
# finished run is skipped when rerun. Then scripts/suite_pilot_table.py tabulates them
# (docs/study/suite/pilot/ keeps each run's run_done.json as <task>-<before|after>.json).
set -u
cd "$(dirname "$0")/.."
export OMP_WAIT_POLICY=PASSIVE
# label|reasoning-gym task|generator settings (empty: the generator's defaults, as the recipe runs them)
tasks=(
 "chain_sum|chain_sum|min_terms=2,max_terms=2,min_digits=1,max_digits=2"
 "simple_equations|simple_equations|"
 "leg_counting|leg_counting|"
 "letter_counting|letter_counting|"
 "family_relationships|family_relationships|"
 "syllogism|syllogism|"
 "simple_equations_small|simple_equations|min_terms=2,max_terms=2,max_value=20"
 "spell_backward|spell_backward|max_word_len=6"
 "base_conversion|base_conversion|max_value=64"
 "leg_counting_small|leg_counting|min_animals=1,max_animals=2,max_instances=3"
 "gcd|gcd|max_value=50"
 "count_bits|count_bits|max_n=63"
)
for entry in "${tasks[@]}"; do
  label=${entry%%|*}; rest=${entry#*|}; task=${rest%%|*}; config=${rest#*|}
  for phase in before after; do
    out=outputs/pilot/$label/$phase
    mkdir -p "outputs/pilot/$label"
    [ -f "$out/run_done.json" ] && continue
    if [ $phase = before ]; then extra="--max_steps 1 --learning_rate 0.0"; else extra="--max_steps 48 --learning_rate 3e-4"; fi
    echo "== $label $phase $(date +%T)"
    dualadam-hf train --config recipes/smollm2_suite_lora.yaml --optim adamw_torch \
      --dataset_name "reasoning-gym:$task" --dataset_config "$config" --dataset_test_split validation \
      --eval_size 100 --accuracy_size 100 --sharpness false --eval_strategy no \
      --save_strategy no --output_dir "$out" $extra > "$out.log" 2>&1 || echo "FAILED $task $phase (see $out.log)"
  done
done
