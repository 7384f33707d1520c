"""Run under torchrun by test_distributed.py: sharded validation of one checkpoint, confusion matrix to JSON."""
import json
import sys

import torch

from pixelseg.core.checkpoint import load_checkpoint
from pixelseg.data import collate_batch, load_split
from pixelseg.core.distributed import RankSampler, cleanup, init_distributed
from pixelseg.inference.loading import load_model
from pixelseg.training.loop import RunContext, evaluate_loader

ckpt_path, n_val, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
info = init_distributed("cpu")
ckpt = load_checkpoint(ckpt_path)
ds = load_split("synthetic", None, "val", 32, limit=n_val)
model = load_model(ckpt, torch.device("cpu"))
loader = torch.utils.data.DataLoader(ds, batch_size=1, sampler=RankSampler(len(ds), info), collate_fn=collate_batch)
cm, loss = evaluate_loader(model, loader, RunContext(torch.device("cpu"), None, True, info), ds.info, progress=False)
if info.is_main:
    json.dump({"cm": cm.mat.tolist(), "world": info.world_size, "local": len(loader)}, open(out, "w"))
cleanup(info)
