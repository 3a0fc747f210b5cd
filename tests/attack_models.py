"""Models that try to beat the scorer's causality and state checks, and what each must get.

Only torch is imported here: the hostile suite pastes this file's source into candidate
train.py files that run in the training container, and the direct scorer tests import it.
Each model is uniform where it is honest and "knows" the next token where it looks ahead
(logit 20 on it), so a look-ahead that got through would score below an honest model.
"""

from __future__ import annotations

import torch

SEQ = 1024                         # prepare.SEQ_LEN, the length of every scored row


def peek(idx, use, V: int):
    """Logits that put 20 on the next token where `use` (broadcast to [B, T]) is set, and are
    uniform (zero) elsewhere."""
    nxt = torch.nn.functional.one_hot(torch.roll(idx, -1, dims=1), V).float()
    return nxt * (20.0 * use.float()).expand(idx.shape)[..., None]


def peek_mask(kind: str) -> torch.Tensor:
    """Which positions look at the next token."""
    if kind == "all-but-one":      # every position but the one just before the old fixed cut
        mask = torch.ones(SEQ, dtype=torch.bool)
        mask[SEQ // 2 - 1] = False
        return mask
    share = {"random-90": 0.9, "random-5": 0.05, "random-1": 0.01}[kind]
    g = torch.Generator().manual_seed(1234)
    return torch.rand(SEQ, generator=g) < share


class PeekMask(torch.nn.Module):
    """Looks at the next token at the positions where `mask` is set."""

    def __init__(self, V: int, mask: torch.Tensor):
        super().__init__()
        self.V = V
        self.register_buffer("mask", mask)

    def forward(self, idx):
        return peek(idx, self.mask[:idx.shape[1]][None, :], self.V)


class LateNudge(torch.nn.Module):
    """Honest (uniform) in the first half of a row; in the second half it nudges the logit of
    the next token by +1.5: a small, believable gain."""

    def __init__(self, V: int):
        super().__init__()
        self.V = V

    def forward(self, idx):
        T = idx.shape[1]
        nxt = torch.nn.functional.one_hot(torch.roll(idx, -1, dims=1), self.V).float()
        late = (torch.arange(T, device=idx.device) >= T // 2).float()[None, :, None]
        return nxt * 1.5 * late


class BatchGated(torch.nn.Module):
    """Looks ahead only when the batch has the scorer's number of rows."""

    def __init__(self, V: int, rows: int):
        super().__init__()
        self.V, self.rows = V, rows

    def forward(self, idx):
        return peek(idx, torch.ones_like(idx[:, 0]).sum() == self.rows, self.V)


class ParamCounter(torch.nn.Module):
    """Counts its calls in a parameter it changes in place; honest for the first two calls
    (where the old probe looked), looks ahead after that."""

    def __init__(self, V: int):
        super().__init__()
        self.V = V
        self.calls = torch.nn.Parameter(torch.zeros(()), requires_grad=False)

    def forward(self, idx):
        self.calls.add_(1)
        return peek(idx, self.calls > 2, self.V)


class BufferCounter(ParamCounter):
    """The same counter kept in a buffer."""

    def __init__(self, V: int):
        super().__init__(V)
        del self.calls
        self.register_buffer("calls", torch.zeros(()))


class ConstantCounter(torch.nn.Module):
    """The same counter in a plain tensor attribute, which export lifts as a constant."""

    def __init__(self, V: int):
        super().__init__()
        self.V = V
        self.calls = torch.zeros(())

    def forward(self, idx):
        self.calls.add_(1)
        return peek(idx, self.calls > 2, self.V)


class RandomGate(torch.nn.Module):
    """Draws from the global generator, whose state changes from call to call."""

    def __init__(self, V: int):
        super().__init__()
        self.V = V

    def forward(self, idx):
        return peek(idx, torch.rand(()) > 0.5, self.V)


class AttentionDropout(torch.nn.Module):
    """Attention with dropout left on: random, so two identical calls differ."""

    def __init__(self, V: int):
        super().__init__()
        self.V = V

    def forward(self, idx):
        q = torch.nn.functional.one_hot(idx, 8).float()[:, None]
        h = torch.nn.functional.scaled_dot_product_attention(q, q, q, dropout_p=0.5, is_causal=True)
        return torch.zeros(idx.shape[0], idx.shape[1], self.V) + h.sum(-1).squeeze(1)[..., None]


class Dropout(torch.nn.Module):
    """Uniform logits through dropout: random when `train` (honest and deterministic when not,
    as in train.py's exports on a GPU)."""

    def __init__(self, V: int, train: bool):
        super().__init__()
        self.V, self.train_ = V, train

    def forward(self, idx):
        h = torch.ones(idx.shape[0], idx.shape[1], self.V)
        return torch.nn.functional.dropout(h, 0.2, self.train_) * 0


class Slow(torch.nn.Module):
    """Honest but slow: a forward that burns time on large matrix products."""

    def __init__(self, V: int, width: int = 1024, rounds: int = 64):
        super().__init__()
        self.V, self.rounds = V, rounds
        self.register_buffer("w", torch.randn(width, width) / width ** 0.5)

    def forward(self, idx):
        h = self.w[: idx.shape[1]]
        for _ in range(self.rounds):
            h = torch.tanh(h @ self.w)
        return torch.zeros(idx.shape[0], idx.shape[1], self.V) + h.sum() * 0


def build(kind: str, V: int, rows: int = 16) -> torch.nn.Module:
    """One attack model by name (the names of ATTACKS)."""
    if kind.startswith("peek-"):
        return PeekMask(V, peek_mask(kind[len("peek-"):]))
    return {"late-nudge": lambda: LateNudge(V), "batch-gated": lambda: BatchGated(V, rows),
            "param-counter": lambda: ParamCounter(V), "buffer-counter": lambda: BufferCounter(V),
            "constant-counter": lambda: ConstantCounter(V), "random-gate": lambda: RandomGate(V),
            "attention-dropout": lambda: AttentionDropout(V),
            "dropout-on": lambda: Dropout(V, True)}[kind]()


ATTACKS = {                        # kind -> words the `invalid` reason must hold
    "peek-all-but-one": "not causal",
    "peek-random-90": "not causal",
    "peek-random-5": "not causal",
    "late-nudge": "not causal",
    "batch-gated": "not causal",
    "param-counter": "mutates state",
    "buffer-counter": "mutates state",
    "constant-counter": "mutate",          # torch's own loader refuses this one
    "random-gate": "random op",
    "attention-dropout": "random op",
    "dropout-on": "random op",
}


def export(module: torch.nn.Module, path: str) -> str:
    """torch.export with the dynamic batch and sequence dimensions the scorer needs."""
    batch = torch.export.Dim("batch", min=1, max=4096)
    seq = torch.export.Dim("seq", min=2, max=SEQ)
    ep = torch.export.export(module, (torch.zeros(2, 16, dtype=torch.long),),
                             dynamic_shapes={"idx": {0: batch, 1: seq}})
    torch.export.save(ep, path)
    return path
