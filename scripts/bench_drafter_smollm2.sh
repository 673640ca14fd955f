#!/bin/sh
# SmolLM2-135M-Instruct with its fitted drafter against transformers (plain and prompt lookup) and our plain
# decoding, batch 1, 2 threads, per domain, greedy and T=0.7 (results/drafter-smollm2.md). Needs a quiet machine.
#   sh scripts/bench_drafter_smollm2.sh DRAFTER [PROMPTS TOKENS REPEATS [OUT_PREFIX [EXTRA_FLAGS...]]]
# EXTRA_FLAGS go to bench-decode, e.g. "--compile --gamma 4" (our two sides under torch.compile).
set -e
DRAFTER=${1:-runs/drafters/smollm2}; N=${2:-16}; TOKENS=${3:-128}; REPEATS=${4:-3}; PREFIX=${5:-results/drafter-smollm2}
shift $(( $# < 5 ? $# : 5 ))
MODEL=$(nextlat fetch-smollm2)
D=runs/drafter-data
for domain in stories code chat; do
    chat=""; [ "$domain" = chat ] && chat="--chat"
    nextlat bench-decode "$MODEL" --drafter "$DRAFTER" --prompt-file "$D/${domain}_test.jsonl" $chat --label "$domain" \
        --prompts "$N" --max-new-tokens "$TOKENS" --repeats "$REPEATS" --temperatures 0 0.7 --threads 2 \
        --json "$PREFIX-$domain.json" "$@"
done
