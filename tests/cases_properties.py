"""Property-based tier-2 cases: hypothesis draws routings and options, every rank runs the ops, and each
rank checks its slice against ``deep_ep_ops.reference`` (the oracle that defines every output).

Modes (one rank function, :func:`run_mode`, with a mode argument):

* ``normal``: ``get_dispatch_layout``, ``dispatch`` (payload bf16 / fp16 / fp32 / FP8 tuple with float32
  row- or column-major scales / FP8 tuple with UE8M0 int32 scales / INT8 wire via ``quant_mode="int8"``;
  ``expert_alignment``; ``num_worst_tokens`` sometimes; ``MOE_EXPERT_TOKEN_NUMS_TYPE`` 0/1; with
  ``topk_idx`` and weights, ids only, or the layout alone), cached dispatch, and ``combine`` with 0–2
  biases and the dispatched weights, on the transport's default rings or on tight ``num_nvl_bytes`` rings
  (``shm``).
* ``low_latency``: ``M >= max N``; wire formats bf16 (bf16 or fp32 ``x``) / FP8 / FP8 ``round_scale`` /
  UE8M0 (hidden % 512 == 0) / INT8; receive hooks on/off, ``out=``, cumulative stats, shared-expert ranks
  (``MOE_SHARED_EXPERT_RANK_NUM``) now and then, ``num_rdma_bytes`` 0 or DeepEP's hint.
* ``fused``: ``fused_deep_moe`` with ``quant_mode`` 1 (W8A8) and 0 (bf16 weights) against the unfused chain
  and the reference (bitwise) and the float32 MoE (the tolerance of ``cases_fused``).

Shared by every mode: world sizes 1–4; ``N`` from 0 to 64 per rank, with skew (now and then one rank has
``N = 0``; now and then every token of every rank selects one expert in slot 0 with the other slots ``-1``,
or that one expert in every slot); ``E`` up to 512, a multiple of the ranks that host routed experts;
``K`` from 1 to 8 (``K <= E``); random ``-1`` slots (up to all of them) and duplicate expert ids within a
token; zero rows and very small or large values; empty inputs with all-zero strides; every example on a
transport (``all_to_all`` or ``shm``) and kernels (``python`` or ``native``, when built) drawn by
hypothesis, through ``DEEP_USE_MODE`` / ``DEEP_EP_OPS_KERNELS`` set around the ``Buffer`` (built for the
example and destroyed after it).

Duplicate ids in normal mode: the README documents them only for the low-latency ops, but the reference
defines them in normal mode too (``get_dispatch_layout`` counts every slot, a token still travels once to a
rank, ``num_recv_tokens_per_expert`` counts a (token, local expert) pair once, and every slot's weight
travels and sums back), and the ops follow it, so they are generated in every mode. K: no limit is
documented besides ``K <= E`` (DeepEP's own kernels allow up to 128 slots, ``tuning._NUM_MAX_TOPK``); the
strategies stay at DeepEP's usual top-8.

Lockstep design. Every rank runs hypothesis itself with the same settings and the same seed
(``derandomize=True`` and ``@seed``, ``database=None``, phases explicit + generate only: shrinking would
replay examples differently on different ranks), so every rank draws the same examples in the same order
and runs the collective ops together. Hypothesis only draws numbers (sizes, options, a seed); each rank
builds all ranks' tensors from that seed with torch, which keeps generation cheap. An example never raises
on one rank only: every exception is caught and recorded with the example and its traceback. The ops of an
example all run first; the comparisons run afterwards, so a mismatch on one rank cannot leave the others
waiting in an op. After each example the ranks exchange, on a separate gloo group, a digest of the example
and where it failed; if they drew different examples, or failed in different ops or by a timeout (the group
may then be unusable), the remaining examples are skipped on every rank. :func:`run_mode` returns the
number of examples run, their digest, the failures and the wall time; the test checks that all ranks ran
the same examples and that none failed.

Profiles (registered below; each also fixes the seed, and :data:`BUDGETS` gives its examples per mode and
world size):

* ``ci`` (the default): a fixed seed and a budget that keeps ``tests/test_properties_dist.py`` at about a
  minute and a half of wall time on 2 CPU cores.
* ``thorough``: 1000 examples per mode and world size. Selected with ``DEEP_EP_OPS_PROPERTY_PROFILE``, e.g.
  the normal and low-latency modes at 2 ranks::

      DEEP_EP_OPS_PROPERTY_PROFILE=thorough python -m pytest -q -s tests/test_properties_dist.py -k "R2 and (normal or low_latency)"

  (``-s`` prints a line per mode with its example count and wall time). On 2 cores expect roughly 20–60
  minutes per mode at 2 ranks (more at 3 and 4).

Other knobs: ``DEEP_EP_OPS_PROPERTY_SEED=<int>`` changes the seed (other examples), and
``DEEP_EP_OPS_PROPERTY_EXAMPLES=<int>`` overrides the number of examples of the selected profile.
"""

from __future__ import annotations

import collections
import hashlib
import importlib
import os
import pkgutil
import sys
import time
import traceback

import torch
import torch.distributed as dist
from hypothesis import HealthCheck, Phase, Verbosity, example, given, settings
from hypothesis import seed as hypothesis_seed
from hypothesis import strategies as st

from _data import odd_empty
from benchmarks._chains import unfused_deep_moe
from cases_fused import dense_moe
from cases_low_latency import dequant, wire_kwargs
from cases_normal import _to_float, assert_same, env
import deep_ep_ops
import deep_ep_ops.transports
import meta_kernels
from deep_ep_ops import Buffer, compute, make_fused_weights, quant, reference
from deep_ep_ops.transports import _shm_engine



def _import_every_module() -> None:
    """Imports the whole package now. Hypothesis also draws constants it finds in local modules and re-reads
    them whenever ``sys.modules`` grows, so a module imported lazily in the middle of a run (a transport's
    first use) would change the examples drawn after it."""
    for package in (deep_ep_ops, deep_ep_ops.transports, meta_kernels):
        for info in pkgutil.iter_modules(package.__path__, package.__name__ + "."):
            importlib.import_module(info.name)


_import_every_module()

MODES = ("normal", "low_latency", "fused")
WORLD_SIZES = (1, 2, 3, 4)

PROFILE_ENV = "DEEP_EP_OPS_PROPERTY_PROFILE"
SEED_ENV = "DEEP_EP_OPS_PROPERTY_SEED"
EXAMPLES_ENV = "DEEP_EP_OPS_PROPERTY_EXAMPLES"

_SETTINGS = dict(derandomize=True, database=None, phases=[Phase.explicit, Phase.generate], deadline=None,
                 suppress_health_check=list(HealthCheck), print_blob=False, verbosity=Verbosity.quiet,
                 report_multiple_bugs=False)
settings.register_profile("ci", max_examples=12, **_SETTINGS)
settings.register_profile("thorough", max_examples=1000, **_SETTINGS)

#: The fixed seed of each profile (``DEEP_EP_OPS_PROPERTY_SEED`` overrides it).
SEEDS = {"ci": 20250601, "thorough": 1000003}
#: Examples per (mode, world size); a profile missing here uses its ``max_examples`` everywhere.
BUDGETS = {
    "ci": {("normal", 1): 60, ("normal", 2): 40, ("normal", 3): 25, ("normal", 4): 20,
           ("low_latency", 1): 50, ("low_latency", 2): 30, ("low_latency", 3): 15, ("low_latency", 4): 12,
           ("fused", 1): 30, ("fused", 2): 16, ("fused", 3): 12, ("fused", 4): 10},
}

MAX_TOKENS = 64  # per rank
MAX_EXPERTS = 512
MAX_TOPK = 8
#: Low-latency layouts hold E * M * hidden elements per rank, and the reference builds every rank's:
#: hidden is drawn among the sizes that keep that at most this many elements.
LL_ELEMENTS = 1 << 23
#: fused: (E + 1) * 2I * hidden weight elements at most (every rank builds every expert's weights).
FUSED_WEIGHT_ELEMENTS = 1 << 22
TIMEOUT_S = 60  # Buffer timeout: a rank waits this long for its peers


def selected_profile() -> str:
    name = os.environ.get(PROFILE_ENV) or "ci"
    settings.get_profile(name)  # raises for an unknown name
    return name


def selected_seed(profile: str) -> int:
    raw = os.environ.get(SEED_ENV)
    return int(raw) if raw else SEEDS.get(profile, 0)


def budget(profile: str, mode: str, world: int) -> int:
    raw = os.environ.get(EXAMPLES_ENV)
    if raw:
        return int(raw)
    return BUDGETS.get(profile, {}).get((mode, world), settings.get_profile(profile).max_examples)


def run_timeout_s(examples: int) -> float:
    """What ``RankPool.run`` may wait for a whole run: generous per example (3 s), at least 4 minutes."""
    return max(240.0, 3.0 * examples + 60.0)


# --- strategies: hypothesis draws numbers and options; torch builds the tensors ------------------------

KERNELS = ("python", "native") if compute.native_loaded() else ("python",)
TRANSPORTS = ("all_to_all", "shm")
SMALL_HIDDEN = (128, 256, 384, 512)
LARGE_HIDDEN = (1024, 2048, 7168)


def _hidden(draw, allowed=lambda h: True, multiple: int = 128) -> int:
    """Mostly 128–512; now and then larger (only sizes ``allowed`` and divisible by ``multiple``)."""
    small = [h for h in SMALL_HIDDEN if h % multiple == 0 and allowed(h)]
    large = [h for h in LARGE_HIDDEN if h % multiple == 0 and allowed(h)]
    if large and draw(st.integers(0, 7)) == 7:
        return draw(st.sampled_from(large))
    return draw(st.sampled_from(small))


@st.composite
def _common(draw, world: int, routed_ranks: int) -> dict:
    """Routing and placement shared by every mode (``routed_ranks``: ranks that host routed experts)."""
    max_local = MAX_EXPERTS // routed_ranks
    local = draw(st.one_of(st.integers(1, min(8, max_local)), st.integers(1, max_local), st.just(max_local)))
    num_experts = local * routed_ranks
    tokens = draw(st.lists(st.integers(0, MAX_TOKENS), min_size=world, max_size=world))
    # One rank with an empty batch (at one rank the token count itself reaches 0 often enough).
    empty = draw(st.one_of(st.none(), st.integers(0, world - 1))) if world > 1 else None
    if empty is not None:
        tokens[empty] = 0
    num_topk = draw(st.one_of(st.integers(1, min(MAX_TOPK, num_experts)), st.just(min(MAX_TOPK, num_experts))))
    routing = draw(st.sampled_from(("random", "random", "random", "one_expert", "hot_all_slots")))
    return dict(
        transport=draw(st.sampled_from(TRANSPORTS)),
        kernels=draw(st.sampled_from(KERNELS)),
        seed=draw(st.integers(0, 2 ** 31 - 1)),
        tokens=tuple(tokens),
        num_experts=num_experts,
        num_topk=num_topk,
        routing=routing,  # random | one_expert (slot 0, others -1) | hot_all_slots (that expert in every slot)
        hot_expert=draw(st.one_of(st.integers(0, num_experts - 1), st.just(num_experts - 1))),
        drop=draw(st.sampled_from((0.0, 0.0, 0.1, 0.5, 1.0))),  # fraction of slots set to -1
        dup=draw(st.sampled_from((0.0, 0.0, 0.3, 1.0))) if num_topk > 1 else 0.0,  # tokens with a duplicate id
        magnitude=draw(st.sampled_from((1.0, 1.0, 1.0, 1e-5, 300.0))),
        zero_rows=draw(st.sampled_from((0.0, 0.0, 0.25))),
        odd_empty=draw(st.booleans()),
    )


@st.composite
def normal_params(draw, world: int) -> dict:
    p = draw(_common(world, world))
    p["hidden"] = hidden = _hidden(draw)
    payloads = ["bfloat16", "bfloat16", "float32", "float16", "fp8", "fp8_colmajor", "int8"]
    if hidden % 512 == 0:
        payloads.append("fp8_ue8m0")
    p.update(
        payload=draw(st.sampled_from(payloads)),
        topk=draw(st.sampled_from(("weights", "weights", "weights", "ids", "layout"))),
        alignment=draw(st.sampled_from((1, 1, 1, 2, 3, 8, 128))),
        worst_extra=draw(st.one_of(st.none(), st.none(), st.integers(0, 16))),  # num_worst_tokens - max rows
        nums_type=draw(st.sampled_from((1, 0))),
        bias=draw(st.integers(0, 2)),
        combine_dtype=draw(st.sampled_from(("same", "same", "bfloat16", "float32"))),
        # shm: rings (num_nvl_bytes) that hold this many of the widest rows (1: every run wraps).
        ring_rows=draw(st.sampled_from((None, None, None, 1, 2, 3))),
    )
    return p


def _placement(draw, world: int) -> tuple[int, dict, int]:
    """``(shared-expert ranks, common params, M)`` of the low-latency and fused modes: ``M`` at least the
    largest ``N``, sometimes with room to spare."""
    shared = draw(st.sampled_from((0, 0, 0, 0, 1, world - 1))) if world > 1 else 0
    p = draw(_common(world, world - shared))
    return shared, p, max(max(p["tokens"]), 1) + draw(st.sampled_from((0, 0, 1, 7)))


@st.composite
def low_latency_params(draw, world: int) -> dict:
    shared, p, m = _placement(draw, world)
    formats = ["bf16", "fp8", "fp8_round", "int8"]
    if p["num_experts"] * m * 512 <= 2 * LL_ELEMENTS:  # UE8M0 needs hidden % 512 == 0: a larger allowance
        formats.append("ue8m0")
    fmt = draw(st.sampled_from(formats))
    limit = 2 * LL_ELEMENTS if fmt == "ue8m0" else LL_ELEMENTS
    budget_ok = lambda h: p["num_experts"] * m * h <= limit  # noqa: E731
    p.update(
        shared=shared,
        m=m,
        fmt=fmt,
        hidden=_hidden(draw, budget_ok, 512 if fmt == "ue8m0" else 128),
        x_dtype=draw(st.sampled_from(("bfloat16", "bfloat16", "bfloat16", "float32"))) if fmt == "bf16"
        else "bfloat16",
        hook=draw(st.booleans()),
        out=draw(st.booleans()),
        stats=draw(st.sampled_from((False, False, True))),
        nums_type=draw(st.sampled_from((1, 0))),
        rdma=draw(st.sampled_from(("hint", "zero"))),
    )
    return p


@st.composite
def fused_params(draw, world: int) -> dict:
    shared, p, m = _placement(draw, world)
    hidden = draw(st.sampled_from((128, 128, 256, 512)))
    fits = [i for i in (32, 64, 128) if (p["num_experts"] + 1) * 2 * i * hidden <= FUSED_WEIGHT_ELEMENTS]
    if not fits:
        hidden = 128
        fits = [32]
    p.update(shared=shared, m=m, hidden=hidden, intermediate=draw(st.sampled_from(fits)),
             quant_mode=draw(st.sampled_from((1, 0))), magnitude=1.0)  # fused: bf16 x of ordinary size
    return p


STRATEGIES = {"normal": normal_params, "low_latency": low_latency_params, "fused": fused_params}


def explicit_examples(mode: str, world: int) -> list[dict]:
    """Extremes run first on every seed: every rank empty; E at its largest, K = 8, every token of every
    rank on one expert (a full batch), with the biggest layouts the budgets allow."""
    e_max = MAX_EXPERTS // world * world
    base = dict(transport="shm", kernels=KERNELS[-1], seed=1, num_topk=MAX_TOPK, drop=0.0, dup=0.0,
                magnitude=1.0, zero_rows=0.0, odd_empty=True)
    if mode == "normal":
        extra = dict(hidden=256, payload="int8", topk="weights", alignment=1, worst_extra=None, nums_type=1,
                     bias=2, combine_dtype="same", ring_rows=None)
    elif mode == "low_latency":
        extra = dict(shared=0, m=MAX_TOKENS, fmt="fp8", hidden=128, x_dtype="bfloat16", hook=True, out=False,
                     stats=True, nums_type=1, rdma="zero")
    else:
        extra = dict(shared=0, m=MAX_TOKENS, hidden=128, intermediate=32, quant_mode=1)
    empty = {**base, **extra, "tokens": (0,) * world, "num_experts": e_max, "routing": "random", "hot_expert": 0,
             "transport": "all_to_all", "kernels": KERNELS[0]}
    if mode in ("low_latency", "fused"):
        empty["m"] = 1
    hot = {**base, **extra, "tokens": (MAX_TOKENS,) * world, "num_experts": e_max, "routing": "one_expert",
           "hot_expert": e_max - 1}
    dup = {**hot, "routing": "hot_all_slots", "hot_expert": 0, "transport": "all_to_all"}
    return [empty, hot, dup]


# --- inputs -------------------------------------------------------------------------------------------

def build_inputs(p: dict, world: int) -> dict:
    """Every rank's ``x`` (float32, scaled), ``topk_idx`` and ``topk_weights`` from the drawn seed."""
    g = torch.Generator().manual_seed(p["seed"])
    num_experts, k = p["num_experts"], p["num_topk"]
    xs, idx, w = [], [], []
    for r in range(world):
        n = p["tokens"][r]
        x = torch.randn(n, p["hidden"], generator=g) * p["magnitude"]
        if p["zero_rows"]:
            x[torch.rand(n, generator=g) < p["zero_rows"]] = 0
        if p["routing"] == "random":
            i = torch.rand(n, num_experts, generator=g).topk(k, dim=1).indices
            if p["dup"]:
                rows = (torch.rand(n, generator=g) < p["dup"]).nonzero().flatten()
                src = torch.randint(0, k, (n,), generator=g)[rows]
                dst = (src + 1 + torch.randint(0, k - 1, (n,), generator=g)[rows]) % k
                i[rows, dst] = i[rows, src]
            if p["drop"]:
                i = i.masked_fill(torch.rand(n, k, generator=g) < p["drop"], -1)
        elif p["routing"] == "one_expert":
            i = torch.full((n, k), -1, dtype=torch.int64)
            i[:, 0] = p["hot_expert"]
        else:  # hot_all_slots
            i = torch.full((n, k), p["hot_expert"], dtype=torch.int64)
        xs.append(x)
        idx.append(i)
        w.append(torch.rand(n, k, generator=g))
    return {"x": xs, "topk_idx": idx, "topk_weights": w}


def _odd(p: dict, t):
    return odd_empty(t) if p["odd_empty"] else t


# --- normal mode ----------------------------------------------------------------------------------------

def _normal_payloads(p: dict, xs: list) -> tuple[list, list | None]:
    payload = p["payload"]
    if payload.startswith("fp8"):
        pairs = [quant.per_block_fp8(x, round_scale=payload == "fp8_ue8m0", use_ue8m0=payload == "fp8_ue8m0")
                 for x in xs]
        scales = [s.t().contiguous().t() if payload == "fp8_colmajor" else s for _, s in pairs]
        return [q for q, _ in pairs], scales
    dtype = torch.bfloat16 if payload == "int8" else getattr(torch, payload)
    return [x.to(dtype) for x in xs], None


def _normal_setup(p: dict, world: int) -> dict:
    inp = build_inputs(p, world)
    xs, scales = _normal_payloads(p, inp["x"])
    num_experts = p["num_experts"]
    layouts = [reference.get_dispatch_layout(i, num_experts, world) for i in inp["topk_idx"]]
    max_rows = max(int(sum(lay[3][:, r].sum() for lay in layouts)) for r in range(world))
    worst = 0 if p["worst_extra"] is None else max_rows + p["worst_extra"]
    g = torch.Generator().manual_seed(p["seed"] + 1)
    return dict(inp=inp, xs=xs, scales=scales, layouts=layouts, worst=worst, gen=g)


def _normal_combine_dtype(p: dict, t: torch.Tensor) -> torch.Tensor:
    return t if p["combine_dtype"] == "same" else t.to(getattr(torch, p["combine_dtype"]))


def _normal_run(rank: int, world: int, p: dict, s: dict, progress: list) -> dict:
    """Every op of the example, in order (collectives only; no comparison)."""
    nvl = 0
    if p["ring_rows"]:
        # The widest row through the rings: an fp32 payload, a metadata row, or the per-expert counts of a
        # layout-only dispatch (int64 per local expert).
        row = max(4 * p["hidden"], 1024, 8 * (p["num_experts"] // world))
        nvl = _shm_engine.ring_segment_bytes(world, p["ring_rows"] * ((row + 63) // 64 * 64))
    with env(DEEP_USE_MODE=p["transport"], DEEP_EP_OPS_KERNELS=p["kernels"],
             MOE_EXPERT_TOKEN_NUMS_TYPE=str(p["nums_type"])):
        progress.append("Buffer")
        buf = Buffer(dist.group.WORLD, num_nvl_bytes=nvl, timeout_s=TIMEOUT_S)
    try:
        # Twice on one Buffer: the first call of a configuration runs the portable kernels, a second one may
        # run the backend's whole-op path (shm with native kernels); the check compares both.
        first = _normal_ops(rank, world, p, s, progress, buf)
        out = _normal_ops(rank, world, p, s, progress, buf)
        out["first"] = first
        return out
    finally:
        buf.destroy()


def _normal_ops(rank: int, world: int, p: dict, s: dict, progress: list, buf) -> dict:
    inp, xs, scales = s["inp"], s["xs"], s["scales"]
    with_idx, with_w = p["topk"] != "layout", p["topk"] == "weights"
    out = {}
    out["backend"] = (buf.transport, buf.kernels)
    idx = _odd(p, inp["topk_idx"][rank])
    progress.append("get_dispatch_layout")
    out["layout"] = buf.get_dispatch_layout(idx, p["num_experts"])
    per_rank, _, per_expert, in_rank, _ = out["layout"]
    x = _odd(p, xs[rank])
    x = (x, _odd(p, scales[rank])) if scales is not None else x
    w = _odd(p, inp["topk_weights"][rank])
    progress.append("dispatch")
    out["dispatch"] = buf.dispatch(
        x, num_tokens_per_rank=per_rank, is_token_in_rank=in_rank, num_tokens_per_expert=per_expert,
        topk_idx=idx if with_idx else None, topk_weights=w if with_w else None,
        expert_alignment=p["alignment"], num_worst_tokens=s["worst"],
        quant_mode="int8" if p["payload"] == "int8" else None)
    recv_x, _, recv_w, _, handle, event = out["dispatch"]
    event.current_stream_wait()
    # Cached dispatch along the handle: another payload of the same format, and the weights unmasked.
    x2 = (x[0].clone(), x[1].clone()) if scales is not None else x * 2
    progress.append("cached dispatch")
    out["cached"] = buf.dispatch(x2, handle=handle, topk_weights=w if with_w else None)
    progress.append("combine")
    y = _normal_combine_dtype(p, _to_float(recv_x))
    biases = _normal_biases(p, world, y.dtype)[rank]
    out["combine"] = buf.combine(y, handle, topk_weights=recv_w, bias=biases if biases else None)
    return out


def _normal_biases(p: dict, world: int, dtype) -> list[tuple]:
    g = torch.Generator().manual_seed(p["seed"] + 2)
    return [tuple(_odd(p, torch.randn(p["tokens"][r], p["hidden"], generator=g).to(dtype)) for _ in range(p["bias"]))
            for r in range(world)]


def _normal_check(rank: int, world: int, p: dict, s: dict, out: dict) -> None:
    for ops in (out["first"], out):
        _normal_check_ops(rank, world, p, s, ops)


def _normal_check_ops(rank: int, world: int, p: dict, s: dict, out: dict) -> None:
    inp, xs, scales, layouts, worst = s["inp"], s["xs"], s["scales"], s["layouts"], s["worst"]
    with_idx, with_w = p["topk"] != "layout", p["topk"] == "weights"
    int8 = p["payload"] == "int8"
    assert out["backend"] == (p["transport"], p["kernels"]), out["backend"]
    per_rank, per_node, per_expert, in_rank, _ = out["layout"]
    assert per_node is None  # one node
    for name, got, want in zip(("num_tokens_per_rank", "num_tokens_per_expert", "is_token_in_rank"),
                               (per_rank, per_expert, in_rank), (layouts[rank][0], layouts[rank][2], layouts[rank][3])):
        assert_same(name, got, want)

    refs = reference.dispatch(
        xs, inp["topk_idx"] if with_idx else None, inp["topk_weights"] if with_w else None, p["num_experts"],
        x_scales=scales, is_token_in_rank=[lay[3] for lay in layouts],
        num_tokens_per_expert=[lay[2] for lay in layouts], expert_alignment=p["alignment"], num_worst_tokens=worst,
        quant_mode="int8" if int8 else "none", expert_token_nums_type=p["nums_type"])
    ref = refs[rank]
    recv_x, recv_idx, recv_w, counts, handle, _ = out["dispatch"]
    if scales is not None or int8:
        assert_same("recv_x", recv_x, (ref.recv_x, ref.recv_x_scales))
    else:
        assert_same("recv_x", recv_x, ref.recv_x)
    if int8:
        # |x - q*s| <= s/2 per element (round to nearest), plus the fp32 rounding of x/s and q*s.
        plain = reference.dispatch(xs, inp["topk_idx"] if with_idx else None, None, p["num_experts"],
                                   is_token_in_rank=[lay[3] for lay in layouts],
                                   num_tokens_per_expert=[lay[2] for lay in layouts],
                                   num_worst_tokens=worst)[rank].recv_x.float()
        err = (quant.dequant_int8(*recv_x) - plain).abs()
        bound = 0.5 * recv_x[1].unsqueeze(1) * (1 + 1e-4) + 1e-30
        assert bool((err <= bound).all()), f"int8 error {float((err - bound).max())} over the bound"
    assert_same("recv_topk_idx", recv_idx, ref.recv_topk_idx if with_idx else None)
    assert_same("recv_topk_weights", recv_w, ref.recv_topk_weights if with_w else None)
    want_counts = [] if worst else ref.num_recv_tokens_per_expert.tolist()
    assert counts == want_counts, (counts, want_counts)
    assert_same("handle", handle, ref.handle)
    if worst:
        rows = recv_x[0].shape[0] if isinstance(recv_x, tuple) else recv_x.shape[0]
        assert rows == worst, (rows, worst)

    got = out["cached"]
    assert got[1] is None and got[3] is None and got[4] is None
    xs2 = xs if scales is not None else [t * 2 for t in xs]
    want = reference.cached_dispatch(xs2, refs, x_scales=scales,
                                     topk_weights=inp["topk_weights"] if with_w else None)[rank]
    assert_same("cached recv_x", got[0], (want[0], want[1]) if scales is not None else want[0])
    assert_same("cached recv_topk_weights", got[2], want[2])

    expert_out = [_normal_combine_dtype(p, _to_float((d.recv_x, d.recv_x_scales) if d.recv_x_scales is not None
                                                     else d.recv_x)) for d in refs]
    biases = _normal_biases(p, world, expert_out[0].dtype)
    combined, combined_w, _ = out["combine"]
    want_x, want_w = reference.combine(
        expert_out, refs, topk_weights=[d.recv_topk_weights for d in refs] if with_w else None,
        bias=biases if p["bias"] else None)[rank]
    assert_same("combined_x", combined, want_x)
    assert_same("combined_topk_weights", combined_w, want_w)
    if with_w:
        # DeepEP's invariant: combining the dispatched weights gives back the original weights.
        masked = torch.where(inp["topk_idx"][rank] >= 0, inp["topk_weights"][rank], 0.0)
        assert_same("combined weights == original", combined_w, masked)


# --- low-latency mode -----------------------------------------------------------------------------------

def _ll_setup(p: dict, world: int) -> dict:
    inp = build_inputs(p, world)
    xs = [x.to(getattr(torch, p["x_dtype"])) for x in inp["x"]]
    return dict(inp=inp, xs=xs)


def _ll_run(rank: int, world: int, p: dict, s: dict, progress: list) -> dict:
    m, num_experts = p["m"], p["num_experts"]
    with env(DEEP_USE_MODE=p["transport"], DEEP_EP_OPS_KERNELS=p["kernels"],
             MOE_SHARED_EXPERT_RANK_NUM=str(p["shared"]), MOE_EXPERT_TOKEN_NUMS_TYPE=str(p["nums_type"])):
        # DeepEP's hint (no num_topk), as DeepEP code sizes it; it follows the shared-expert ranks of the env.
        hint = Buffer.get_low_latency_rdma_size_hint(m, p["hidden"], world, num_experts,
                                                     dtype=getattr(torch, p["x_dtype"]))
        rdma = hint if p["rdma"] == "hint" else 0
        progress.append("Buffer")
        buf = Buffer(dist.group.WORLD, low_latency_mode=True, num_rdma_bytes=rdma, timeout_s=TIMEOUT_S)
    try:
        first = _ll_ops(rank, world, p, s, progress, buf)  # the portable kernels, then maybe the whole-op path
        out = _ll_ops(rank, world, p, s, progress, buf)
        out["first"] = first
        return out
    finally:
        buf.destroy()


def _ll_ops(rank: int, world: int, p: dict, s: dict, progress: list, buf) -> dict:
    xs, idx, w = s["xs"], s["inp"]["topk_idx"], s["inp"]["topk_weights"]
    m, num_experts, kw = p["m"], p["num_experts"], wire_kwargs(p["fmt"])
    out = {}
    out["backend"] = (buf.transport, buf.kernels)
    x, i, wk = _odd(p, xs[rank]), _odd(p, idx[rank]), _odd(p, w[rank])
    local = 1 if rank < p["shared"] else num_experts // (world - p["shared"])
    stats = torch.zeros(local, dtype=torch.int32) if p["stats"] else None
    progress.append("low_latency_dispatch")
    recv_x, count, handle, _, hook = buf.low_latency_dispatch(
        x, i, m, num_experts, cumulative_local_expert_recv_stats=stats, return_recv_hook=p["hook"], **kw)
    out["hook"] = hook
    if p["hook"]:
        progress.append("low_latency_dispatch (hook)")
        hook()
    out["dispatch"] = (recv_x, count, handle)
    if stats is not None:
        progress.append("low_latency_dispatch (stats)")
        buf.low_latency_dispatch(x, i, m, num_experts, cumulative_local_expert_recv_stats=stats, **kw)
        out["stats"] = stats
    data, scales = recv_x if isinstance(recv_x, tuple) else (recv_x, None)
    y = dequant(data, scales).bfloat16()  # identity experts on the dequantized rows, padding included
    target = torch.full((x.shape[0], p["hidden"]), float("nan"), dtype=torch.bfloat16) if p["out"] else None
    progress.append("low_latency_combine")
    combined, _, hook = buf.low_latency_combine(y, i, wk, handle, out=target, return_recv_hook=p["hook"])
    if p["hook"]:
        progress.append("low_latency_combine (hook)")
        hook()
    out["combine"] = (combined, target, hook)
    return out


def _ll_check(rank: int, world: int, p: dict, s: dict, out: dict) -> None:
    for ops in (out["first"], out):
        _ll_check_ops(rank, world, p, s, ops)


def _ll_check_ops(rank: int, world: int, p: dict, s: dict, out: dict) -> None:
    xs, idx, w = s["xs"], s["inp"]["topk_idx"], s["inp"]["topk_weights"]
    m, num_experts, kw, shared = p["m"], p["num_experts"], wire_kwargs(p["fmt"]), p["shared"]
    assert out["backend"] == (p["transport"], p["kernels"]), out["backend"]
    refs = reference.low_latency_dispatch(
        xs, idx, m, num_experts, use_fp8=kw.get("use_fp8", True), round_scale=kw.get("round_scale", False),
        use_ue8m0=kw.get("use_ue8m0", False), quant_mode=kw.get("quant_mode", "none"),
        num_shared_expert_ranks=shared, expert_token_nums_type=p["nums_type"])
    ref = refs[rank]
    assert (out["hook"] is not None) == p["hook"]
    recv_x, count, handle = out["dispatch"]
    data, scales = recv_x if isinstance(recv_x, tuple) else (recv_x, None)
    assert data.shape == ref.packed_recv_x.shape and data.dtype == ref.packed_recv_x.dtype, \
        (data.shape, data.dtype, ref.packed_recv_x.shape, ref.packed_recv_x.dtype)
    assert_same("packed_recv_count", count, ref.packed_recv_count)
    assert_same("layout_range", handle[1], ref.layout_range)
    assert handle[2:] == (m, p["hidden"], num_experts), handle[2:]
    valid = (ref.layout_range & 0xFFFFFFFF).sum(dim=1)
    rows = torch.arange(data.shape[1]).unsqueeze(0) < valid.unsqueeze(1)  # [L, R*M] valid rows
    assert_same("valid rows", data[rows], ref.packed_recv_x[rows])
    assert_same("src_info", handle[0][rows], ref.src_info[rows])
    if scales is None:
        assert ref.packed_recv_x_scales is None
    else:
        assert scales.shape == ref.packed_recv_x_scales.shape and scales.dtype == ref.packed_recv_x_scales.dtype
        assert_same("scales", scales[rows], ref.packed_recv_x_scales[rows])
        _ll_quant_bound(xs, data, scales, ref, rows)
    if p["stats"]:
        assert_same("cumulative stats", out["stats"], (2 * valid).to(torch.int32))
    ys = [dequant(d.packed_recv_x, d.packed_recv_x_scales).bfloat16() for d in refs]
    want = reference.low_latency_combine(ys, idx, w, refs, num_experts, shared)[rank]
    combined, target, _ = out["combine"]
    assert target is None or combined is target
    assert_same("combined_x", combined, want)


def _ll_quant_bound(xs: list, data, scales, ref, rows) -> None:
    """Dequantized valid rows against the original tokens they came from (see cases_low_latency):
    INT8 ``|x - q*s| <= s/2`` plus fp32 rounding; FP8 e4m3 ``<= 2^-4 |x|`` plus one subnormal step."""
    n = ref.layout_range & 0xFFFFFFFF  # [L, R]
    position = torch.arange(data.shape[1]).expand(n.shape[0], -1).contiguous()
    src_rank = torch.searchsorted(n.cumsum(1), position, right=True)[rows]  # blocks are in source order
    offsets = torch.tensor([0] + [x.shape[0] for x in xs]).cumsum(0)
    orig = torch.cat(xs).float()[offsets[src_rank] + ref.src_info[rows].long()]
    got = dequant(data[rows], scales[rows])
    err = (got - orig).abs()
    if data.dtype == torch.int8:
        bound = 0.5 * scales[rows].unsqueeze(1) * (1 + 1e-4) + 1e-30
    else:
        full = quant.unpack_ue8m0(scales[rows]) if scales.dtype == torch.int32 else scales[rows]
        bound = orig.abs() * 2 ** -4 + full.repeat_interleave(128, dim=1) * 2 ** -9
    assert bool((err <= bound).all()), f"{data.dtype} dequantization error {float((err - bound).max())} over its bound"


# --- fused -------------------------------------------------------------------------------------------------

def _fused_setup(p: dict, world: int) -> dict:
    inp = build_inputs(p, world)
    xs = [x.bfloat16() for x in inp["x"]]
    g = torch.Generator().manual_seed(p["seed"] + 3)
    h, i, e = p["hidden"], p["intermediate"], p["num_experts"]
    w13 = torch.randn(e + 1, 2 * i, h, generator=g) * h ** -0.5  # expert e < E routed, E the shared one
    w2 = torch.randn(e + 1, h, i, generator=g) * i ** -0.5
    weights = []
    for r in range(world):
        if r < p["shared"]:
            sl = slice(e, e + 1)
        else:
            local = e // (world - p["shared"])
            sl = slice((r - p["shared"]) * local, (r - p["shared"] + 1) * local)
        weights.append(make_fused_weights(w13[sl], w2[sl], p["quant_mode"]))
    return dict(inp=inp, xs=xs, w13=w13, w2=w2, weights=weights)


def _fused_run(rank: int, world: int, p: dict, s: dict, progress: list) -> dict:
    x = _odd(p, s["xs"][rank])
    i, w = _odd(p, s["inp"]["topk_idx"][rank]), _odd(p, s["inp"]["topk_weights"][rank])
    with env(DEEP_USE_MODE=p["transport"], DEEP_EP_OPS_KERNELS=p["kernels"],
             MOE_SHARED_EXPERT_RANK_NUM=str(p["shared"])):
        progress.append("Buffer")
        buf = Buffer(dist.group.WORLD, low_latency_mode=True, timeout_s=TIMEOUT_S)
    try:
        out = {"backend": (buf.transport, buf.kernels)}
        progress.append("fused_deep_moe")
        out["fused"] = buf.fused_deep_moe(x, i, w, *s["weights"][rank], p["m"], p["num_experts"],
                                          quant_mode=p["quant_mode"])
        progress.append("unfused chain")
        out["unfused"] = unfused_deep_moe(buf, x, i, w, *s["weights"][rank], p["m"], p["num_experts"],
                                          quant_mode=p["quant_mode"])
        return out
    finally:
        buf.destroy()


def _fused_check(rank: int, world: int, p: dict, s: dict, out: dict) -> None:
    xs, idx, w = s["xs"], s["inp"]["topk_idx"], s["inp"]["topk_weights"]
    assert out["backend"] == (p["transport"], p["kernels"]), out["backend"]
    fused, count = out["fused"]
    unfused, unfused_count = out["unfused"]
    assert_same("ep_recv_count vs unfused", count, unfused_count)
    assert_same("output vs unfused", fused, unfused)
    ref = reference.fused_deep_moe(xs, idx, w, s["weights"], p["m"], p["num_experts"], p["quant_mode"],
                                   p["shared"])[rank]
    assert_same("output vs reference", fused, ref[0])
    assert_same("ep_recv_count vs reference", count, ref[1])
    dense = _dense_fp32(p, s, rank)
    if dense.numel() and float(dense.norm()) > 0:
        rel = float((fused.float() - dense).norm() / dense.norm())
        # cases_fused's bounds, except W8A8 with a 32-wide intermediate: there the INT8 step of the
        # intermediate activations (per token amax/127 over 32 heavy-tailed SwiGLU values) is larger relative
        # to their RMS, and a rank with a few tokens measured 4.02e-2 (thorough profile, R4) while being
        # bitwise equal to the reference and the unfused chain above.
        bound = (6e-2 if p["intermediate"] <= 32 else 4e-2) if p["quant_mode"] == 1 else 1e-2
        assert rel < bound, f"relative error {rel:.4g} vs the float32 MoE exceeds {bound}"


def _dense_fp32(p: dict, s: dict, rank: int) -> torch.Tensor:
    """This rank's MoE output in float32 with the unquantized weights (duplicate ids count per slot)."""
    return dense_moe(s["xs"][rank], s["inp"]["topk_idx"][rank], s["inp"]["topk_weights"][rank], s["w13"], s["w2"],
                     p["num_experts"] if p["shared"] else None)


def features(mode: str, p: dict) -> list[str]:
    """What an example covers, counted over a run (printed by the test with ``-s``)."""
    tokens = p["tokens"]
    out = [p["transport"], p["kernels"], p["routing"],
           {"normal": lambda: p["payload"], "low_latency": lambda: p["fmt"],
            "fused": lambda: f"quant_mode={p['quant_mode']}"}[mode]()]
    if len(tokens) > 1 and min(tokens) == 0 < max(tokens):
        out.append("an empty rank")
    if max(tokens) == 0:
        out.append("all empty")
    if max(tokens) == MAX_TOKENS:
        out.append(f"N={MAX_TOKENS}")
    if p["num_experts"] >= 256:
        out.append("E>=256")
    if p["num_topk"] == MAX_TOPK:
        out.append(f"K={MAX_TOPK}")
    if p["routing"] == "random" and p["dup"]:
        out.append("duplicate ids")
    if p["routing"] == "random" and p["drop"]:
        out.append("-1 slots")
    if p["hidden"] > 512:
        out.append("hidden>512")
    if p.get("shared"):
        out.append("shared-expert ranks")
    if mode == "normal":
        out += [f"topk={p['topk']}"] + (["num_worst_tokens"] if p["worst_extra"] is not None else []) + \
            (["tight rings"] if p["ring_rows"] and p["transport"] == "shm" else [])
    if mode == "low_latency" and p["hook"]:
        out.append("hooks")
    return out


MODE_FUNCS = {"normal": (_normal_setup, _normal_run, _normal_check),
              "low_latency": (_ll_setup, _ll_run, _ll_check),
              "fused": (_fused_setup, _fused_run, _fused_check)}


# --- the rank function -------------------------------------------------------------------------------------

_STATUS_GROUP = None


def _status_group():
    """A gloo group of its own for the per-example status exchange, apart from the ops' traffic."""
    global _STATUS_GROUP
    if _STATUS_GROUP is None:
        _STATUS_GROUP = dist.new_group(backend="gloo")
    return _STATUS_GROUP


def _digest(text: str) -> int:
    return int(hashlib.sha256(text.encode()).hexdigest()[:15], 16)


def run_mode(rank: int, world: int, mode: str, profile: str, seed: int, max_examples: int) -> dict:
    """Runs ``max_examples`` hypothesis examples of ``mode`` on every rank in lockstep (module docstring).

    Returns:
        ``{"examples": run, "digest": of every example run, "failures": [(example repr, traceback)],
        "stopped": why the rest was skipped or None, "seconds": wall time}``.
    """
    setup, run, check = MODE_FUNCS[mode]
    group = _status_group()
    state = {"examples": 0, "failures": [], "stopped": None, "digest": hashlib.sha256(),
             "features": collections.Counter()}
    start = time.perf_counter()

    def one(params: dict) -> None:
        if state["stopped"]:
            return
        state["examples"] += 1
        text = repr(params)
        state["digest"].update(text.encode())
        state["features"].update(features(mode, params))
        progress: list[str] = []
        failed_in = None  # the op running when an exception left the ops, or "setup"/"check"
        timed_out = False
        try:
            prepared = setup(params, world)
        except BaseException:
            failed_in, tb = "setup", traceback.format_exc()
        else:
            try:
                out = run(rank, world, params, prepared, progress)
            except BaseException as exc:
                # The op, not the step: a failure may surface in the send or in the receive hook of one op.
                failed_in, tb = f"op {progress[-1].split()[0] if progress else '?'}", traceback.format_exc()
                timed_out = "timed out" in str(exc) or "timeout" in str(exc).lower()
            else:
                try:
                    check(rank, world, params, prepared, out)
                except BaseException:
                    failed_in, tb = "check", traceback.format_exc()
        if failed_in is not None:
            state["failures"].append((text, f"[rank {rank}, failed in {failed_in}]\n{tb}"))
            print(f"\n[{mode} R{world}] rank {rank} example {state['examples']} failed in {failed_in}: {text}\n{tb}",
                  file=sys.stderr, flush=True)
        # (example digest, op that failed or 0, timed out) of every rank, as int64 (no numpy for *_object).
        op_failed = failed_in if failed_in and failed_in.startswith("op") else None
        mine = torch.tensor([_digest(text), _digest(op_failed) + 1 if op_failed else 0, int(timed_out)])
        statuses = [torch.empty_like(mine) for _ in range(world)]
        dist.all_gather(statuses, mine, group=group)
        statuses = [tuple(t.tolist()) for t in statuses]
        if len({d for d, _, _ in statuses}) > 1:
            state["stopped"] = f"ranks drew different examples at example {state['examples']}: {statuses}"
        elif len({f for _, f, _ in statuses}) > 1 or any(t for _, _, t in statuses):
            state["stopped"] = (f"ranks failed in different ops or timed out at example {state['examples']} "
                                f"(rank: op failed, timed out): {[(f != 0, bool(t)) for _, f, t in statuses]}")

    # Assembled here so that every rank builds the same test: settings, seed and explicit examples.
    test = given(params=STRATEGIES[mode](world))(one)
    for params in reversed(explicit_examples(mode, world)):
        test = example(params=params)(test)
    test = settings(settings.get_profile(profile), max_examples=max_examples)(test)
    test = hypothesis_seed(seed)(test)
    test()
    if state["stopped"]:
        # The process group may be unusable (a timeout, or ranks out of step): raising makes RankPool restart
        # the ranks before the next run. The message carries this rank's first failures.
        first = "\n\n".join(f"example: {text}\n{tb}" for text, tb in state["failures"][:2])
        raise RuntimeError(f"{mode}: stopped after {state['examples']} examples: {state['stopped']}; "
                           f"{len(state['failures'])} failure records on rank {rank}, first:\n{first}")
    return {"examples": state["examples"], "digest": state["digest"].hexdigest(), "failures": state["failures"],
            "features": dict(state["features"]), "seconds": time.perf_counter() - start}
