#!/usr/bin/env bash
# The GPU figures in RESULTS.md: run on a lent GPU machine from the repository root, with clearlm's
# pure-Python dependencies installed as wheels into /tmp/site (the machine has torch, transformers,
# tokenizers, safetensors, typer, rich). DATA holds a few MB of text for the recipe smoke run.
#   DATA=.gpudata OUT=out bash benchmarks/gpu_run.sh
set -euo pipefail
RUNS=$(mktemp -d)
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
# 1. Throughput of one training step at GPT-2 small dims, bf16 autocast and compile, against transformers.
python3 benchmarks/train_throughput.py --device cuda --precision bf16 --compile --vocab 50304 --d-model 768 \
  --n-layers 12 --n-heads 12 --context 1024 --batch 16 --steps 10 --rounds 3 --json "$OUT/gpu_throughput.json"
# 2. The 124M recipe end to end through `clearlm train` on CUDA (a short run: 40 steps of 64k tokens).
python3 -m clearlm train recipes/gpt2-124m.toml --workdir "$RUNS" \
  --set "data.sources=[{path=\"$PWD/$DATA\", license=\"LicenseRef-PublicDomain\", tail_validation=0.1}]" --set "data.steps=[]" \
  --set train.max_steps=40 --set train.grad_accum_steps=4 --set train.eval_interval=20 --set train.checkpoint_interval=0
cp "$RUNS"/artifacts/train-*/log.jsonl "$OUT/gpt2_124m_log.jsonl"
python3 - "$RUNS" <<'PY'
import glob, json, sys
m = json.load(open(glob.glob(sys.argv[1] + "/artifacts/train-*/manifest.json")[0]))["metrics"]
print({k: m[k] for k in ("steps", "tokens_per_s", "mfu", "peak_flops", "compiled", "device", "final_loss", "val_loss")})
print("vocabulary", json.load(open(glob.glob(sys.argv[1] + "/artifacts/train-*/model_config.json")[0]))["vocab_size"])
PY
