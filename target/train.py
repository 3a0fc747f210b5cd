"""Train a small GPT for a fixed time budget, then export it for scoring.

Usage:
    PYTHONPATH=prepare python target/train.py
    AUTORESEARCH_TIME_BUDGET=30 PYTHONPATH=prepare python target/train.py  # quick check

How it keeps the rules of program.md:
- The budget is wall time on the runner's clock, from the start of this process: imports,
  compilation, holdout checks and the export all count. At the deadline the runner freezes
  the process and scores the last model.pt2 it saved. So the script plans on
  prepare.time_left(): it saves a fallback model at once (which measures what the last check
  and the final save will take; each check in training measures the check again), trains
  until only that margin is left, then saves the best weights. The final save reuses the
  fallback's traced program when it still holds the model's own tensors (the best weights are
  copied into them in place, so it holds them too) and computes what the model computes;
  otherwise it traces again, and the margin plans for that.
  Every save goes through prepare.save_model (write, then rename: never half a model); a
  save of the same program again writes only its weights (prepare.resave_seconds).
- Compilation counts too, so COMPILE = "blocks" compiles one block, whose graph all DEPTH
  blocks share (their weights are its inputs), and the head with the loss: on an H200 a
  changed model's first step takes ~13 s cold against ~26 s as one whole graph, at the same
  tokens/s (bench/RESULTS.md). A compiled graph is kept between runs while it does not change.
- The seed is prepare.SEED, which the runner sets per run (noise runs and reruns use other
  seeds): it drives the initialisation and the order of the data.
- Over-fitting is watched on a held-out tail of the *training* split; the validation split is
  never here, and only the trusted scorer computes val_bpb.
- The exported program maps int64 tokens idx [B, T] (any B, T <= prepare.SEQ_LEN) to float32
  next-token logits [B, T, vocab_size]; it is causal and pure (no state, no randomness, no
  buffer updates), which the scorer checks.

It prints a progress line about every PRINT_EVERY_S seconds and ends with a `---` line
followed by `key: value` summary lines.
"""

import contextlib
import math
import os
import resource
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import prepare

# ---- Knobs: what an experiment may change (one value each, for the GPU) ----
# On a machine without a GPU the CPU configuration below replaces some of them.

# Model
DEPTH = 8                       # transformer blocks
WIDTH = 640                     # residual stream width (d_model), a multiple of HEAD_DIM
HEAD_DIM = 128                  # per-head width (even, for RoPE); n_heads = WIDTH // HEAD_DIM
MLP_RATIO = 4                   # MLP hidden width = MLP_RATIO * WIDTH
ROPE_BASE = 10000.0             # rotary embedding base frequency
LOGIT_SOFTCAP = 15.0            # logits = cap * tanh(logits / cap); 0 disables
DROPOUT = 0.2                   # residual dropout: small data sets are seen many times

# Data and batch
SEQ_LEN = prepare.SEQ_LEN       # training context length (the scorer evaluates prepare.SEQ_LEN)
DEVICE_BATCH = 64               # sequences per forward/backward pass
TOTAL_BATCH = 2**18             # tokens per optimizer step: a multiple of DEVICE_BATCH * SEQ_LEN

# Optimizers: Muon for the 2-D matrices inside blocks, AdamW for everything else (see
# optimizer_groups: a new parameter lands in a group by what it is, with no change needed)
MATRIX_LR = 0.02                # Muon learning rate
MUON_MOMENTUM = 0.95            # Muon (nesterov) momentum
NS_STEPS = 5                    # Newton-Schulz iterations per Muon step
EMBED_LR = 0.3                  # AdamW learning rate of embeddings (nn.Embedding tables)
HEAD_LR = 0.004                 # AdamW learning rate of the lm_head
SCALAR_LR = 0.04                # AdamW learning rate of anything else: gains, biases, scalars
ADAM_BETAS = (0.8, 0.95)        # AdamW betas
WEIGHT_DECAY = 0.0              # AdamW weight decay

# Learning-rate schedule, as fractions of the training window (time, not steps)
WARMUP_FRAC = 0.02              # linear warm-up from 0 (0: none)
WARMDOWN_FRAC = 0.4             # linear decay over the last part of the window (0: none)
FINAL_LR_FRAC = 0.05            # lr multiplier at the end of the decay

# Over-fitting watch: the tail of the training split is held out and checked every few
# seconds, and the best weights seen are the ones exported. Five minutes on an H100 is
# hundreds of passes over a 5 MB text. The checks count against the budget like the rest.
HOLDOUT_TOKENS = 2**16          # training tokens held out (0: none; the last weights are exported)
EVAL_EVERY_S = 10.0             # seconds between holdout checks

COMPILE = "blocks"              # torch.compile: "blocks" (one block's graph, reused by every
                                # block, and the head with the loss: seconds to compile, and a
                                # changed graph starts fast), "whole" (model and loss as one
                                # graph: may fuse more, compiles DEPTH times longer), "" (none)

# ---- Set by the harness and the rules: not experiments, do not change ----

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"   # the runner's GPU, if it gave one
GPU = DEVICE == "cuda"
TIME_BUDGET = prepare.TIME_BUDGET   # wall seconds, everything counts; the moment: prepare.DEADLINE
# The margin kept at the end for the last holdout check and the final save, from the fallback's
# own timings: the save alone when the final save will reuse the fallback's program (measured
# on a first call, so on the safe side), the trace and the save when it will not; the check
# from the fallback's (a first call too) until the checks in training measure it.
EXPORT_SAFETY = 1.5             # keep this many times the measured last check + final save ...
EXPORT_SLACK_S = 1.0            # ... plus these seconds, for the runner's own jitter
PEAK_FLOPS = 989.5e12           # dense bf16 FLOP/s of an H100/H200, for MFU
PRINT_EVERY_S = 5.0             # seconds between progress lines

# ---- CPU configuration (CI and laptops; ignored on a GPU) ----
# A toy model, so that a few seconds on 2 cores still make progress. Results are judged on
# the GPU values above; this block only keeps CPU runs working, and need not follow them.

if not GPU:
    DEPTH = 2
    WIDTH = 64
    HEAD_DIM = 16
    DROPOUT = 0.0
    SEQ_LEN = 128
    DEVICE_BATCH = 16
    TOTAL_BATCH = 16 * 128
    MATRIX_LR = 0.05
    EMBED_LR = 0.1
    HEAD_LR = 0.03
    HOLDOUT_TOKENS = 2**11
    EVAL_EVERY_S = max(1.0, TIME_BUDGET / 40)
    COMPILE = ""                # far too slow on 2 CPU cores
    PRINT_EVERY_S = 0.5

# ---- Checks: settings that cannot work together stop here, with the reason ----

tokens_per_micro = DEVICE_BATCH * SEQ_LEN
if TOTAL_BATCH < tokens_per_micro or TOTAL_BATCH % tokens_per_micro:
    raise SystemExit(f"TOTAL_BATCH ({TOTAL_BATCH} tokens) must be a whole multiple of one "
                     f"micro-batch, DEVICE_BATCH * SEQ_LEN = {DEVICE_BATCH} * {SEQ_LEN} = "
                     f"{tokens_per_micro}: change TOTAL_BATCH or DEVICE_BATCH")
if COMPILE not in ("blocks", "whole", ""):
    raise SystemExit(f'COMPILE must be "blocks", "whole" or "" (none), not {COMPILE!r}')
if WIDTH % HEAD_DIM or HEAD_DIM % 2:
    raise SystemExit(f"WIDTH ({WIDTH}) must be a multiple of HEAD_DIM ({HEAD_DIM}), and HEAD_DIM "
                     f"even (RoPE rotates pairs of coordinates)")

# ---- Model ----


def norm(x):
    # RMSNorm without a learnable weight.
    return F.rms_norm(x, (x.size(-1),))


def apply_rotary(x, cos, sin):
    # x: [B, H, T, D]. Rotate the two halves of each head as pairs of coordinates.
    # cos/sin are float32, so bf16 inputs are promoted (autocast casts back for attention).
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)


class Attention(nn.Module):
    def __init__(self):
        super().__init__()
        self.n_heads = WIDTH // HEAD_DIM
        # Separate q/k/v matrices so Muon orthogonalises each one on its own.
        self.c_q = nn.Linear(WIDTH, WIDTH, bias=False)
        self.c_k = nn.Linear(WIDTH, WIDTH, bias=False)
        self.c_v = nn.Linear(WIDTH, WIDTH, bias=False)
        self.c_proj = nn.Linear(WIDTH, WIDTH, bias=False)

    def forward(self, x, cos, sin):
        B, T, C = x.shape
        q, k, v = (lin(x).view(B, T, self.n_heads, HEAD_DIM).transpose(1, 2)
                   for lin in (self.c_q, self.c_k, self.c_v))
        # QK-norm keeps attention logits bounded, which allows higher learning rates.
        q, k = norm(q), norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        # An explicit contiguous copy, not reshape(): an exported reshape becomes a view
        # that only fits the memory layout of the attention kernel it was traced with,
        # and the CUDA and CPU kernels lay their outputs out differently.
        y = y.transpose(1, 2).clone(memory_format=torch.contiguous_format).view(B, T, C)
        return F.dropout(self.c_proj(y), DROPOUT, self.training)


class MLP(nn.Module):
    def __init__(self):
        super().__init__()
        hidden = int(MLP_RATIO * WIDTH)          # int(): a ratio such as 8 / 3 works too
        self.c_fc = nn.Linear(WIDTH, hidden, bias=False)
        self.c_proj = nn.Linear(hidden, WIDTH, bias=False)

    def forward(self, x):
        return F.dropout(self.c_proj(F.relu(self.c_fc(x)).square()), DROPOUT, self.training)  # ReLU²


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attention()
        self.mlp = MLP()

    def forward(self, x, cos, sin):
        x = x + self.attn(norm(x), cos, sin)
        return x + self.mlp(norm(x))


class GPT(nn.Module):
    def __init__(self, vocab_size, max_len):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, WIDTH)
        self.blocks = nn.ModuleList(Block() for _ in range(DEPTH))
        self.lm_head = nn.Linear(WIDTH, vocab_size, bias=False)
        # RoPE tables for every position the scorer may ask for. Not persistent: they
        # are recomputed from the constants, so they need not be in a state dict.
        inv_freq = ROPE_BASE ** (-torch.arange(0, HEAD_DIM, 2, dtype=torch.float32) / HEAD_DIM)
        angles = torch.outer(torch.arange(max_len, dtype=torch.float32), inv_freq)
        self.register_buffer("cos", angles.cos()[None, None], persistent=False)
        self.register_buffer("sin", angles.sin()[None, None], persistent=False)

    @torch.no_grad()
    def init_weights(self):
        nn.init.normal_(self.wte.weight, std=1.0)        # normed right away, so scale is free
        nn.init.normal_(self.lm_head.weight, std=0.001)
        for block in self.blocks:
            for lin in (block.attn.c_q, block.attn.c_k, block.attn.c_v, block.mlp.c_fc):
                bound = (3 / lin.in_features) ** 0.5     # uniform with std 1/sqrt(fan_in)
                nn.init.uniform_(lin.weight, -bound, bound)
            # Output projections start at zero: each block starts as the identity.
            nn.init.zeros_(block.attn.c_proj.weight)
            nn.init.zeros_(block.mlp.c_proj.weight)

    def forward(self, idx):
        return self.head(self.trunk(idx))

    def trunk(self, idx, blocks=None):
        # The residual stream before the head. Training passes its compiled blocks (`blocks`,
        # the same modules wrapped); the export and the holdout checks run these.
        T = idx.size(1)
        x = norm(self.wte(idx))
        cos, sin = self.cos[:, :, :T], self.sin[:, :, :T]
        for block in self.blocks if blocks is None else blocks:
            x = block(x, cos, sin)
        return x

    def head(self, x):
        logits = self.lm_head(norm(x))
        # Softcap and loss in float32. Under autocast the lm_head returns bf16; the exported
        # model is all float32, so there the branch is skipped and the graph holds no cast
        # (torch.export pins every cast to the device it was traced on).
        if logits.dtype != torch.float32:
            logits = logits.float()
        if LOGIT_SOFTCAP > 0:
            logits = LOGIT_SOFTCAP * torch.tanh(logits / LOGIT_SOFTCAP)
        return logits


# ---- Optimizer ----


def newton_schulz(G, steps):
    """Approximately orthogonalise each matrix of G [N, rows, cols]: push all singular
    values towards 1 with a quintic iteration, in bf16 (it tolerates the low precision)."""
    a, b, c = 3.4445, -4.7750, 2.0315    # coefficients chosen for fast convergence near 0
    X = G.bfloat16()
    tall = G.size(-2) > G.size(-1)
    if tall:                             # iterate on the smaller Gram matrix
        X = X.mT
    X = X / (X.norm(dim=(-2, -1), keepdim=True) + 1e-7)   # spectral norm <= 1
    for _ in range(steps):
        A = X @ X.mT
        X = a * X + (b * A + c * A @ A) @ X
    return X.mT if tall else X


class Muon(torch.optim.Optimizer):
    """Nesterov momentum, then replace the update with its nearest orthogonal matrix.
    One param group per shape so same-shaped matrices are orthogonalised in one batch."""

    def __init__(self, params, lr, momentum, ns_steps):
        params = list(params)
        shapes = sorted({tuple(p.shape) for p in params})
        groups = [{"params": [p for p in params if tuple(p.shape) == s]} for s in shapes]
        super().__init__(groups, dict(lr=lr, momentum=momentum, ns_steps=ns_steps))

    @torch.no_grad()
    def step(self):
        for group in self.param_groups:
            params = [p for p in group["params"] if p.grad is not None]   # unused ones: skip
            if not params:
                continue
            mom = group["momentum"]
            updates = []
            for p in params:
                state = self.state[p]
                if "momentum_buffer" not in state:
                    state["momentum_buffer"] = torch.zeros_like(p.grad)
                buf = state["momentum_buffer"]
                buf.lerp_(p.grad, 1 - mom)
                updates.append(p.grad.lerp(buf, mom))          # nesterov look-ahead
            orth = newton_schulz(torch.stack(updates), group["ns_steps"])
            rows, cols = params[0].shape
            # Orthogonal updates have unit singular values; tall matrices get a boost
            # so the per-element update size does not shrink with the aspect ratio.
            lr = group["lr"] * max(1.0, rows / cols) ** 0.5
            for p, u in zip(params, orth, strict=True):
                p.add_(u.to(p.dtype), alpha=-lr)


def optimizer_groups(model):
    """Every trainable parameter once, in a group chosen by what it is, so that a new one (a
    gain, a bias, a scalar, an embedding, another matrix) needs no change here:
    2-D matrices inside the blocks -> Muon; embedding tables (nn.Embedding, wherever they
    are) -> AdamW at EMBED_LR; the lm_head -> AdamW at HEAD_LR; the rest -> AdamW at SCALAR_LR.
    Returns (Muon's parameters, AdamW's param groups). Tied weights count once."""
    embeddings = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    muon, embed, head, other = [], [], [], []
    for name, p in model.named_parameters():             # a shared tensor is listed once
        if not p.requires_grad:
            continue
        if id(p) in embeddings:
            embed.append(p)
        elif name.startswith("lm_head."):
            head.append(p)
        elif name.startswith("blocks.") and p.ndim == 2:
            muon.append(p)
        else:
            other.append(p)
    groups = [{"params": embed, "lr": EMBED_LR}, {"params": head, "lr": HEAD_LR},
              {"params": other, "lr": SCALAR_LR}]
    return muon, [g for g in groups if g["params"]]


def lr_multiplier(progress):
    # progress = share of the training window gone (see Training), in [0, 1].
    if progress < WARMUP_FRAC:
        return progress / WARMUP_FRAC
    if progress <= 1 - WARMDOWN_FRAC:
        return 1.0
    decay = (1 - progress) / WARMDOWN_FRAC
    return FINAL_LR_FRAC + (1 - FINAL_LR_FRAC) * max(decay, 0.0)


# ---- Setup ----

torch.manual_seed(prepare.SEED)          # every device's generator
if GPU:
    torch.set_float32_matmul_precision("high")

data_dir = prepare.data_dir()
vocab_size = prepare.load_meta(data_dir)["vocab_size"]
max_len = max(SEQ_LEN, prepare.SEQ_LEN)

with torch.device(DEVICE):               # made where it trains: no init on the CPU to copy over
    model = GPT(vocab_size, max_len)
model.init_weights()
num_params = sum(p.numel() for p in model.parameters())
matrices, adam_groups = optimizer_groups(model)
# FLOPs per token: 6 per weight (forward + backward) for all matmul weights (an embedding
# is a lookup), plus attention scores and values: 12 * depth * width * seq.
embedding_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Embedding))
flops_per_token = 6 * (num_params - embedding_params) + 12 * DEPTH * WIDTH * SEQ_LEN

optimizers = []
if matrices:
    optimizers.append(Muon(matrices, lr=MATRIX_LR, momentum=MUON_MOMENTUM, ns_steps=NS_STEPS))
if adam_groups:
    optimizers.append(torch.optim.AdamW(adam_groups, betas=ADAM_BETAS, eps=1e-10,
                                        weight_decay=WEIGHT_DECAY, fused=GPU))
for opt in optimizers:
    for group in opt.param_groups:
        group["initial_lr"] = group["lr"]

accum_steps = TOTAL_BATCH // tokens_per_micro
loader = prepare.make_dataloader(data_dir, DEVICE_BATCH, SEQ_LEN, DEVICE, seed=prepare.SEED,
                                 holdout_tokens=HOLDOUT_TOKENS)
holdout = (prepare.holdout_batches(data_dir, HOLDOUT_TOKENS, min(DEVICE_BATCH, 8), SEQ_LEN, DEVICE)
           if HOLDOUT_TOKENS else [])


def loss_fn(x, y):
    logits = model(x)
    return F.cross_entropy(logits.flatten(0, 1), y.flatten())


def compiled_loss():
    """loss_fn, compiled as COMPILE says, from the model's own methods (edit the model, not
    this). The head is compiled with the cross-entropy so the float32 logits need not be kept
    whole. With "blocks", the wrappers share one compiled graph: the blocks differ only in
    their weights, which are its inputs."""
    if COMPILE == "whole":
        return torch.compile(loss_fn)
    blocks = [torch.compile(block) for block in model.blocks]
    head_loss = torch.compile(lambda h, y: F.cross_entropy(model.head(h).flatten(0, 1), y.flatten()))
    return lambda x, y: head_loss(model.trunk(x, blocks), y)


train_loss = compiled_loss() if COMPILE else loss_fn
autocast = torch.autocast("cuda", dtype=torch.bfloat16) if GPU else contextlib.nullcontext()


def sync():
    if GPU:
        torch.cuda.synchronize()


@torch.no_grad()
def holdout_loss():
    model.eval()
    total = 0.0
    for hx, hy in holdout:
        with autocast:
            total += loss_fn(hx, hy).item()
    model.train()
    return total / len(holdout)


out_dir = os.environ.get("AUTORESEARCH_OUT", "./out")
# Example with batch and seq > 1: torch.export specialises dimensions of size 0 or 1.
example = torch.randint(0, vocab_size, (2, 16), device=DEVICE)
dims = {"idx": {0: torch.export.Dim("batch", min=1, max=4096),
                1: torch.export.Dim("seq", min=1, max=max_len)}}


def export_model():
    """Trace the eager model (not the compiled wrapper) as it is, float32 weights and float32
    logits: with no casts in the graph the program runs on whatever device it is moved to.
    Traced in eval mode, so dropout is in the graph switched off (train=False), whatever mode
    the model is in when the program is saved or run."""
    model.eval()
    with torch.no_grad():
        program = torch.export.export(model, (example,), dynamic_shapes=dims)
    model.train()
    return program


def save(program):
    # Atomic: a process frozen halfway leaves the previous model.pt2 whole.
    prepare.save_model(program, os.path.join(out_dir, "model.pt2"))


@torch.no_grad()
def why_not_reusable(program):
    """None if saving `program` again saves the model as it is now, with no new trace; else why
    not. torch.export's program holds the model's own parameter and buffer tensors (the same
    storage, not copies), and the optimizers and load_state_dict write into them in place, so
    the program follows the weights. Two things break that, checked here each time it matters:
    a tensor the program carries that is not the model's (a plain tensor attribute, a constant
    made in forward, a parameter replaced since the trace), and Python state read while tracing
    (a flag, a size, a float) that has changed since, which only shows in what it computes."""
    own = dict(model.named_parameters(remove_duplicate=False))
    own.update(model.named_buffers(remove_duplicate=False))
    for name, tensor in {**program.state_dict, **program.constants}.items():
        mine = own.get(name)
        if not (isinstance(tensor, torch.Tensor) and mine is not None
                and tensor.data_ptr() == mine.data_ptr() and tensor.device == mine.device
                and tensor.shape == mine.shape and tensor.stride() == mine.stride()
                and tensor.dtype == mine.dtype):
            return f"it carries {name}, not the model's parameter or buffer of that name"
    # One forward pass of each on the example: cheap, next to a trace.
    model.eval()
    try:
        same = torch.allclose(program.module()(example), model(example), rtol=1e-4, atol=1e-4)
        why = None if same else "it no longer computes what the model computes"
    except Exception as e:                # a dtype or shape changed since: the graph no longer fits
        why = f"it no longer runs on the model's tensors ({type(e).__name__})"
    finally:
        model.train()
    return why


budget_start = prepare.DEADLINE - TIME_BUDGET     # when the runner's clock started
print(f"device: {DEVICE}  params: {num_params / 1e6:.2f}M  vocab: {vocab_size}  "
      f"depth: {DEPTH}  width: {WIDTH}  seq: {SEQ_LEN}  accum: {accum_steps}  "
      f"budget: {TIME_BUDGET}s  left: {prepare.time_left():.1f}s", flush=True)

# ---- Fallback ----
# Check, trace and save the untrained model at once: a model exists whatever happens later,
# and each step takes as long as it will at the end, which sets the margin kept for the last
# check and the final save. The program is kept: if it holds the model's own tensors, the final
# save saves it again (a trace costs seconds on the GPU, more than the save), so the margin
# counts the trace only when the program cannot be reused.

with torch.no_grad():                    # torch.export's first call pays for its own imports:
    torch.export.export(nn.Linear(2, 2), (torch.zeros(2, 2),))   # once, here, not measured
t0 = time.time()
best_loss, best_state, best_at = holdout_loss() if holdout else math.nan, None, 0.0
t1 = time.time()
program = export_model()
t2 = time.time()
save(program)
t3 = time.time()
trace_again = why_not_reusable(program)  # None: the final save will reuse the program
t4 = time.time()
check_seconds, trace_seconds, save_seconds = t1 - t0, t2 - t1, t3 - t2
# A save of the same program again writes its weights only: prepare keeps the serialized graph.
resave_seconds = prepare.resave_seconds(program)
final_save_seconds = (t4 - t3) + (trace_seconds + save_seconds if trace_again else resave_seconds)


def margin_for(check):
    # Seconds kept at the end for a last holdout check of `check` seconds and the final save.
    return EXPORT_SAFETY * (check + final_save_seconds) + EXPORT_SLACK_S


margin = margin_for(check_seconds)
checked = f"holdout loss {best_loss:.4f}, check {check_seconds:.2f}s" if holdout else "no holdout"
final = f"traced again, {trace_again}" if trace_again else "this program saved again"
print(f"fallback saved: {checked}, trace {trace_seconds:.2f}s, save {save_seconds:.2f}s "
      f"(again {resave_seconds:.2f}s), reuse check {t4 - t3:.2f}s, margin {margin:.1f}s "
      f"(final save: {final}), left {prepare.time_left():.1f}s", flush=True)

# ---- Training ----
# The schedule runs on the time left: from the end of the first step (which pays for
# compilation and, at learning rate 0 with warm-up, fills the optimizer statistics) to the
# deadline less the margin. A step is not started if it would end inside the margin. Each
# holdout check measures the check again, and the margin and the window's end follow it.

step = 0
smooth_loss = 0.0
last_print = time.time()
train_start = train_end = next_eval = 0.0
startup_seconds = dt = 0.0
slowest_check = 0.0                      # of the holdout checks in training (see below)
x, y = next(loader)
while True:
    sync()
    t0 = time.time()
    progress = min((t0 - train_start) / (train_end - train_start), 1.0) if step else 0.0
    lr_mult = lr_multiplier(progress)
    for opt in optimizers:
        for group in opt.param_groups:
            group["lr"] = group["initial_lr"] * lr_mult

    for _ in range(accum_steps):
        with autocast:
            loss = train_loss(x, y)
        (loss / accum_steps).backward()
        x, y = next(loader)                  # fetch the next batch while the GPU works
    for opt in optimizers:
        opt.step()
    model.zero_grad(set_to_none=True)

    loss_value = loss.item()                 # also waits for the GPU
    sync()
    now = time.time()
    dt = now - t0
    if step == 0:
        startup_seconds = now - budget_start     # process start to the first step's end
        train_start, train_end = now, max(now, prepare.DEADLINE - margin)
        next_eval = now + EVAL_EVERY_S
    step += 1
    if not math.isfinite(loss_value):
        raise SystemExit(f"loss is {loss_value} at step {step}: diverged")

    # Bias-corrected exponential moving average of the loss.
    smooth_loss = 0.9 * smooth_loss + 0.1 * loss_value
    shown_loss = smooth_loss / (1 - 0.9**step)
    done = now + (dt if step > 1 else 0.0) >= train_end   # would the next step end in the margin?
    if now - last_print >= PRINT_EVERY_S or done:
        last_print = now
        tok_s = TOTAL_BATCH / dt
        mfu = f"  mfu {100 * tok_s * flops_per_token / PEAK_FLOPS:4.1f}%" if GPU else ""
        print(f"step {step:5d}  {100 * progress:5.1f}%  loss {shown_loss:.4f}  lr {lr_mult:.3f}  "
              f"tok/s {tok_s:9.0f}{mfu}  left {prepare.time_left():5.1f}s", flush=True)
    if holdout and (now >= next_eval or done):
        next_eval = now + EVAL_EVERY_S
        t_check = time.time()
        loss_h = holdout_loss()
        if loss_h < best_loss:
            best_loss, best_at = loss_h, now - train_start
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        # The fallback's check was a first call (kernels loaded, caches filled); the checks in
        # training are what the last one will be like. The margin follows the slowest of them.
        check_seconds = time.time() - t_check
        slowest_check = max(slowest_check, check_seconds)
        margin = margin_for(slowest_check)
        train_end = max(train_start, prepare.DEADLINE - margin)
        print(f"holdout loss {loss_h:.4f} at {now - train_start:.0f}s (best {best_loss:.4f} at "
              f"{best_at:.0f}s), check {check_seconds:.2f}s, margin {margin:.1f}s", flush=True)
    if done:
        break
training_seconds = time.time() - train_start

# ---- Export ----
# The best weights seen, unless the untrained ones (already saved) were never beaten; with
# no holdout, the last weights. load_state_dict copies into the model's tensors in place, so
# the fallback's program holds the best weights too and is saved again as it is, unless the
# check, here where it counts, finds that it no longer fits the model: then a full trace.

t_export = time.time()
export_reused = 0                        # 1: the fallback's program saved again (0: traced/no save)
if not holdout or best_state is not None:
    if best_state is not None:
        model.load_state_dict(best_state)
    why = why_not_reusable(program)
    if why is None:
        export_reused = 1
    else:
        if trace_again is None:          # the margin was kept for the save alone
            print(f"final save: traced again, {why} (the margin counted no trace)", flush=True)
        program = export_model()
    save(program)
export_seconds = time.time() - t_export

# ---- Summary ----

if GPU:
    peak_memory_mb = torch.cuda.max_memory_allocated() / 2**20
else:
    peak_memory_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024   # KiB on Linux
tokens_per_second = (step - 1) * TOTAL_BATCH / max(training_seconds, 1e-9)
summary = {
    "train_loss": f"{shown_loss:.4f}",
    "holdout_loss": f"{best_loss:.4f}",
    "best_at_seconds": f"{best_at:.1f}",
    "startup_seconds": f"{startup_seconds:.1f}",
    "training_seconds": f"{training_seconds:.1f}",
    "total_seconds": f"{TIME_BUDGET - prepare.time_left():.1f}",
    "left_seconds": f"{prepare.time_left():.1f}",
    "num_steps": step,
    "total_tokens_M": f"{step * TOTAL_BATCH / 1e6:.1f}",
    "tokens_per_second": f"{tokens_per_second:.0f}",
    "num_params_M": f"{num_params / 1e6:.2f}",
    "peak_memory_mb": f"{peak_memory_mb:.0f}",
    "depth": DEPTH,
    "export_seconds": f"{export_seconds:.1f}",
    "export_reused": export_reused,
}
if GPU:
    summary["mfu_percent"] = f"{100 * tokens_per_second * flops_per_token / PEAK_FLOPS:.2f}"
print("---")
for key, value in summary.items():
    print(f"{key}: {value}")
sys.stdout.flush()
sys.stderr.flush()

# ---- Exit ----
# Everything is written and flushed. An ordinary exit then tears down what the process built
# (the compiler's objects, the CUDA context): ~1 s on an H200, in which the slot waits and no
# step runs. The process ends here instead (bench/RESULTS.md: 0.1-0.2 s after the summary).
os._exit(0)
