"""DistributedDataParallel with gloo, 2 processes on the CPU: gradients are averaged across
ranks and the replicas stay identical."""
import os
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

WORLD = 2


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank, port, out_dir):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=WORLD)
    try:
        import fuseformer.models as M

        torch.manual_seed(0)  # same initial weights on every rank (DDP also broadcasts rank 0's)
        cfg = M.BertConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                           intermediate_size=48, max_position_embeddings=16)
        model = torch.nn.parallel.DistributedDataParallel(M.BertForMaskedLM(cfg, backend="torch"))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        torch.manual_seed(100 + rank)  # each rank its own data
        for _ in range(2):
            ids = torch.randint(4, 64, (2, 12))
            mask = torch.ones_like(ids)
            mask[1, 8:] = 0
            loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
            opt.zero_grad()
            loss.backward()
            grads = torch.cat([p.grad.flatten() for p in model.parameters()])
            opt.step()
        params = torch.cat([p.detach().flatten() for p in model.parameters()])
        torch.save({"grads": grads, "params": params, "loss": loss.item()}, os.path.join(out_dir, f"{rank}.pt"))
        # Both ranks done before either tears gloo down: a rank that destroyed its group while
        # the other still held the connection aborted that one ("terminate called without an
        # active exception", SIGABRT) once in CI, 2026-11-28.
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif(not dist.is_available() or not dist.is_gloo_available(), reason="needs torch.distributed gloo")
def test_ddp_gloo_two_processes(tmp_path):
    mp.spawn(_worker, args=(_free_port(), str(tmp_path)), nprocs=WORLD, join=True)
    r0, r1 = (torch.load(tmp_path / f"{r}.pt") for r in range(WORLD))
    assert torch.isfinite(r0["grads"]).all() and r0["grads"].abs().sum() > 0
    torch.testing.assert_close(r0["grads"], r1["grads"])  # all-reduced
    torch.testing.assert_close(r0["params"], r1["params"])  # replicas in step
    assert r0["loss"] != r1["loss"]  # the ranks really saw different data
