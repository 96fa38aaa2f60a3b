"""One process of the test of II's all-reduced statistics (tests/test_ddp.py), in a module of its
own so that the spawned processes import torch and the method only, not the tests' set-up."""

from __future__ import annotations

import torch


def ii_rank(rank: int, world_size: int, init_file: str, out: str) -> None:
    """One process of a gloo group: II trained on its half of two global batches."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        from mchad.runs.collector import import_heavy

        import_heavy("mchad.models.methods")  # as the project's processes import it
        from mchad.models.methods import II

        torch.manual_seed(0)
        method = II(n_classes=3, n_embedding=4).train()
        method.norm.eval()
        for z, y in ii_batches():
            part = torch.tensor_split(torch.arange(len(y)), world_size)[rank]
            method.loss(method(z[part]), y[part])
        torch.save(method.running.running_centers, f"{out}/centres{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def ii_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(3)
    # rank 1's half of the first batch holds no class-2 row: its local means would differ
    labels = [torch.tensor([2, 0, 1, 2, 0, 1, 1, 0]), torch.tensor([0, 1, 2, 0, 1, 2, 2, 1])]
    return [(torch.randn(len(y), 4, generator=generator), y) for y in labels]
