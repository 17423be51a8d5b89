"""Worker of tests/test_distributed.py's FSDP2 check (not a test file): DPO on packed batches with the
policy sharded by torch's FSDP2 (`fully_shard`, gloo, CPU), or the same in one process with accumulation 2.

accelerate 1.15 does not apply its FSDP plugin to CPU processes (docs/distributed.md), so the sharding is
torch's own here; the log-probs, packing and loss are prefalign's.

usage: python tests/fsdp2_worker.py OUT.json STEPS          (one process, accumulation 2)
       torchrun --nproc_per_node 2 tests/fsdp2_worker.py OUT.json STEPS
"""

import json
import os
import sys

import torch
import torch.distributed as dist
from transformers import GPT2Config, GPT2LMHeadModel

from prefalign.core.logprobs import EncodedRecord, collate, sequence_logps
from prefalign.methods.dpo import LossConfig, PreferenceLoss

V, BATCH = 53, 4  # records per micro-batch


def records(n):
    g = torch.Generator().manual_seed(0)

    def ids(lo, hi):
        return torch.randint(2, V, (int(torch.randint(lo, hi, (1,), generator=g)),), generator=g).tolist()

    return [EncodedRecord(ids(3, 9), [ids(2, 12), ids(2, 12)], [0, 1]) for _ in range(n)]


def main():
    out, steps = sys.argv[1], int(sys.argv[2])
    torch.set_num_threads(1)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.manual_seed(0)
    config = GPT2Config(
        vocab_size=V, n_layer=2, n_embd=32, n_head=2, n_positions=64,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )  # fmt: skip
    model = GPT2LMHeadModel(config)
    data = records(2 * BATCH * steps)
    with torch.no_grad():  # reference = the initial policy, through the padded layout
        ref, _ = sequence_logps(model.eval(), collate(data, 0))
    for record, logps in zip(data, ref.tolist()):
        record.reference_logps = logps[:2]
    model.train()
    if world > 1:
        from torch.distributed.fsdp import fully_shard  # torch >= 2.6

        for block in model.transformer.h:
            fully_shard(block)
        fully_shard(model)
        assert type(model.lm_head.weight).__name__ == "DTensor"  # really sharded
    loss_fn = PreferenceLoss(LossConfig(name="dpo", beta=0.5))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for step in range(steps):
        micro = [data[(2 * step + k) * BATCH : (2 * step + k + 1) * BATCH] for k in range(2)]
        mine = [micro[rank]] if world > 1 else micro
        total = torch.zeros(())
        for chunk in mine:
            batch = collate(chunk, 0, packed=True)
            logps, n = sequence_logps(model, batch)
            losses_b, _ = loss_fn(
                logps, batch["reference_logps"], batch["ranking"], n, batch["candidate_index"] >= 0
            )
            loss = losses_b.mean()
            (loss / len(mine)).backward()  # FSDP2 averages the ranks' gradients: the same mean
            total = total + loss.detach() / len(mine)
        if world > 1:
            dist.all_reduce(total)
            total = total / world
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(total))
    if rank == 0:
        with open(out, "w") as f:
            json.dump({"losses": losses, "world": world}, f)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
