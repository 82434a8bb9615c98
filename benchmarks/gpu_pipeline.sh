#!/usr/bin/env bash
# GPU checks of the whole path (run on a lent GPU machine from the repository root, clearlm's pure-Python
# dependencies installed as wheels into /tmp/site, as for gpu_run.sh; DATA holds a few MB of text):
#   DATA=.gpu/austen.txt OUT=out bash benchmarks/gpu_pipeline.sh
# (A dry run on a CPU: DEVICE=cpu QS_SETS="--set train.max_steps=20 ..." GPT2_SETS="--set train.device=cpu ..." )
# 1. The quickstart recipe with pretraining and mid-training on CUDA (post-training, eval, trace and release then
#    read the GPU-trained checkpoints on the CPU); the release is loaded by transformers on the GPU and its logits
#    compared with clearlm's.
# 2. kill -9 during GPT-2-small pretraining (bf16, compiled) after its second checkpoint, then `--resume`: the
#    resumed steps' losses against an uninterrupted run's.
set -uo pipefail
export PYTHONPATH=/tmp/site:$PWD/src PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
python3 -c "import torch, transformers; print('torch', torch.__version__, 'transformers', transformers.__version__)"
QS=$(mktemp -d)
start=$(date +%s.%N)
python3 -m clearlm run --workdir "$QS" --set train.device="${DEVICE:-cuda}" ${QS_SETS:-} 2>&1 | tee "$OUT/quickstart.log" | grep -v "^ " | tail -40
echo "quickstart rc=${PIPESTATUS[0]} wall $(python3 -c "print(round($(date +%s.%N) - $start, 1))") s"
python3 - "$QS" <<'PY'
import glob, json, sys
import os
import torch
from transformers import AutoModelForCausalLM
from pathlib import Path
from clearlm.release.load import load_release
for path in glob.glob(f"{sys.argv[1]}/artifacts/train-*/manifest.json"):
    m = json.load(open(path))["metrics"]
    print("train", {k: m.get(k) for k in ("steps", "tokens_per_s", "device", "final_loss", "val_loss")})
for path in glob.glob(f"{sys.argv[1]}/artifacts/midtrain-*/manifest.json"):
    m = json.load(open(path))["metrics"]
    print("midtrain", {k: m.get(k) for k in ("steps", "bits_per_byte_before", "bits_per_byte_after")})
DEVICE = os.environ.get("DEVICE", "cuda")
release = f"{sys.argv[1]}/quickstart/release"
ids = torch.randint(0, 4096, (2, 200), generator=torch.Generator().manual_seed(0))
ours = load_release(Path(release))[0]
with torch.no_grad():
    a = ours(ids).float()
    hf = AutoModelForCausalLM.from_pretrained(release, dtype=torch.float32).to(DEVICE).eval()
    b = hf(ids.to(DEVICE)).logits.float().cpu()
print(f"release: transformers on {DEVICE} vs clearlm on cpu, max |logit difference|", (a - b).abs().max().item())
PY
cp "$QS"/quickstart/release/README.md "$OUT/quickstart_card.md" 2>/dev/null

G=(--set "data.sources=[{path=\"$PWD/$DATA\", license=\"LicenseRef-PublicDomain\", tail_validation=0.1}]"
   --set "data.steps=[]" --set train.max_steps=40 --set train.grad_accum_steps=4 --set train.eval_interval=0
   --set train.checkpoint_interval=10 ${GPT2_SETS:-})
A=$(mktemp -d); B=$(mktemp -d)
python3 -m clearlm train recipes/gpt2-124m.toml --workdir "$A" "${G[@]}" > "$OUT/gpt2_uninterrupted.log" 2>&1
echo "uninterrupted rc=$?"
setsid python3 -m clearlm train recipes/gpt2-124m.toml --workdir "$B" "${G[@]}" > "$OUT/gpt2_killed.log" 2>&1 &
pid=$!
until compgen -G "$B/artifacts/train-*.partial/checkpoints/step-0000020/state.json" >/dev/null; do
  kill -0 $pid 2>/dev/null || break; sleep 0.2; done
kill -9 -- -$pid; wait $pid; echo "killed after: $(ls -d "$B"/artifacts/train-*.partial/checkpoints/step-* | xargs -n1 basename)"
python3 -m clearlm train recipes/gpt2-124m.toml --workdir "$B" "${G[@]}" --resume > "$OUT/gpt2_resumed.log" 2>&1
echo "resumed rc=$?"
python3 - "$A" "$B" <<'PY'
import glob, json, sys
logs = [[json.loads(l) for l in open(glob.glob(f"{d}/artifacts/train-*/log.jsonl")[0])] for d in sys.argv[1:]]
loss = [{r["step"]: r["loss"] for r in log if "loss" in r} for log in logs]
steps = sorted(set(loss[0]) & set(loss[1]))
print("steps compared", len(steps), "max |loss difference|", max(abs(loss[0][s] - loss[1][s]) for s in steps))
print("uninterrupted", [round(loss[0][s], 4) for s in steps[-5:]], "resumed", [round(loss[1][s], 4) for s in steps[-5:]])
PY
