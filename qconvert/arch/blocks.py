"""The decoder-block structure methods need: module names inside one block, and AWQ's scaling groups.

A family's ``BlockLayout`` (table.py) names the modules of one decoder block relative to it
(``model.layers.N``). ``awq_plan`` turns a layout into AutoAWQ's ``get_layers_for_scaling`` groups
(checkpoint-formats.md §3.3):

    prev op (scales folded in)     balanced layers          inspected module
    attn_norm                      q, k, v (or fused qkv)   attn
    v (rows; of qkv: the v rows)   o                        o        (only if v out == o in: no GQA)
    mlp_norm                       gate, up (or gate_up)    mlp
    up (rows; of gate_up: up half) down                     down

A Mixture-of-Experts block (``MoeFFN``: the units and routers found in the materialised block) has the same
attention groups; its MLP groups are

    mlp_norm                       every unit's gate and up,   mlp (the whole sparse block)
                                   and every router
    each unit's up (rows)          that unit's down            that unit's down

where a unit is a routed expert or a shared expert. The routers (``mlp.gate``, Qwen2-MoE's
``shared_expert_gate``) read the norm's output too, so their columns are balanced like the experts' (they
stay unquantized): folded, the float model routes every token exactly as before. AutoAWQ and llm-compressor
balance the experts only, which changes the routing logits by the folded scales.

MLA attention (deepseek2) has no v rows to fold into o (kv_b_proj interleaves each head's k and v rows) but
two norms inside it, each in front of one Linear (llm-compressor's DeepSeek mappings):

    attn_norm                      q_a_proj, kv_a_proj_with_mqa   attn
    q_a_layernorm                  q_b_proj                       q_b_proj
    kv_a_layernorm                 kv_b_proj                      kv_b_proj

and none of its Linears is clipped: each one's output reaches the q·k product.

gemma2/gemma3 feed the MLP through pre_feedforward_layernorm (post_attention_layernorm and
post_feedforward_layernorm act on the *outputs* of o_proj/down_proj: untouched).

SmoothQuant (methods/smoothquant.py) folds its smoothing factors through the same groups, only those whose
previous op is a norm (``norm_groups``: attn_norm → q/k/v, mlp_norm → gate/up), as llm-compressor's
SmoothQuantModifier mappings do (packed-formats-2026.md §3.4).

Clipping skips q and k (their errors are amplified by the q·k product): for a fused qkv only the v rows are
clipped (AutoAWQ clips the whole fused qkv_proj; its skip list only knows separate q/k layers).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from qconvert.errors import BadInput


@dataclass(frozen=True)
class BlockLayout:
    """Module names inside one decoder block; a one-name ``qkv`` / ``gate_up`` is fused ([q; k; v], [gate;
    up]), otherwise they are separate Linears."""

    attn_norm: str = "input_layernorm"
    attn: str = "self_attn"
    qkv: tuple[str, ...] = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")
    o: str = "self_attn.o_proj"
    mlp_norm: str = "post_attention_layernorm"  # the norm whose output feeds gate/up
    mlp: str = "mlp"
    gate_up: tuple[str, ...] = ("mlp.gate_proj", "mlp.up_proj")
    down: str = "mlp.down_proj"
    # norms inside the attention, each feeding one Linear (MLA: q_a_layernorm -> q_b_proj, ...); a layout
    # with them has no v-o group and clips no attention Linear
    attn_inner: tuple[tuple[str, str], ...] = ()


LLAMA_BLOCK = BlockLayout()
GEMMA2_BLOCK = BlockLayout(mlp_norm="pre_feedforward_layernorm")
PHI3_BLOCK = BlockLayout(qkv=("self_attn.qkv_proj",), gate_up=("mlp.gate_up_proj",))
MLA_BLOCK = BlockLayout(qkv=("self_attn.q_a_proj", "self_attn.kv_a_proj_with_mqa"),
                        attn_inner=(("self_attn.q_a_layernorm", "self_attn.q_b_proj"),
                                    ("self_attn.kv_a_layernorm", "self_attn.kv_b_proj")))


@dataclass
class ScalingGroup:
    name: str  # "qkv", "v-o", "gate-up", "up-down" ("up-down mlp.experts.3" per MoE unit)
    prev: str  # the module the scales are folded into (a norm or a Linear), relative to the block
    balanced: list[str]  # Linears (or routers: a 2-D weight) whose input columns are multiplied by s
    inspect: str  # the module whose output error the search minimises
    prev_rows: tuple[int, int] | None = None  # Linear prev op: the output rows feeding the balanced layers
    norm_offset: float = 0.0  # 1.0 for Gemma's RMSNorm (y = norm(x) * (1 + w))
    # the Linears whose pooled input statistics give the activation mean (default: the first balanced one).
    # MoE: every unit's gate. Each token reaches exactly top-k experts (plus every shared expert), so the
    # pooled sum over count is the mean over all tokens of the norm's output
    stats_from: list[str] | None = None
    unit: str | None = None  # MoE up-down groups: the unit ("mlp.experts.3") whose tokens the search sees


@dataclass(frozen=True)
class MoeFFN:
    """The MLP of one MoE block: units (gate, up, down) — routed and shared experts — and the routers."""

    units: list[tuple[str, str, str]]
    routers: list[str]


@dataclass
class BlockPlan:
    """The scaling groups of one block and which Linears are never clipped (whole or partly)."""

    groups: list[ScalingGroup]
    no_clip: set[str] = field(default_factory=set)
    clip_rows: dict[str, tuple[int, int]] = field(default_factory=dict)  # Linear -> the only rows clipped


LinearShape = Callable[[str], tuple[int, int]]  # module name -> (out_features, in_features); raises if absent
Heads = Callable[[], tuple[int, int, int]]  # (n_head, n_head_kv, head_dim) of the block's attention


def norm_groups(layout: BlockLayout, norm_offset: float = 0.0,
                moe: MoeFFN | None = None) -> tuple[ScalingGroup, ScalingGroup]:
    """The two groups whose scales fold into a norm: attn_norm → q/k/v and mlp_norm → gate/up (of every
    MoE unit, and the routers)."""
    off = norm_offset
    attn = ScalingGroup("qkv", layout.attn_norm, list(layout.qkv), layout.attn, norm_offset=off)
    if moe is None:
        return attn, ScalingGroup("gate-up", layout.mlp_norm, list(layout.gate_up), layout.mlp,
                                  norm_offset=off)
    balanced = [name for gate, up, _ in moe.units for name in (gate, up)] + moe.routers
    return attn, ScalingGroup("gate-up", layout.mlp_norm, balanced, layout.mlp, norm_offset=off,
                              stats_from=[gate for gate, _, _ in moe.units])


def awq_plan(layout: BlockLayout, linear: LinearShape, heads: Heads, norm_offset: float = 0.0,
             moe: MoeFFN | None = None) -> BlockPlan:
    """The AWQ scaling groups of one block of this layout (``linear`` reads the block's Linear shapes;
    ``moe``: the block's MoE MLP, None for a dense one)."""
    if len(layout.qkv) == 1:
        return _fused_plan(layout, linear, heads, norm_offset)
    attn, mlp = norm_groups(layout, norm_offset, moe)
    groups = [attn]
    if layout.attn_inner:
        attention = (*layout.qkv, *(lin for _, lin in layout.attn_inner))
        for lin in attention:
            linear(lin)  # refuses a block without it
        for norm, lin in layout.attn_inner:
            name = f"{norm.rsplit('.', 1)[-1]}-{lin.rsplit('.', 1)[-1]}"  # "q_a_layernorm-q_b_proj"
            groups.append(ScalingGroup(name, norm, [lin], lin, norm_offset=norm_offset))
        no_clip = set(attention)
    else:
        q, k, v = layout.qkv
        v_out, o_in = linear(v)[0], linear(layout.o)[1]
        if v_out == o_in:  # no GQA: each v row feeds exactly one o column
            groups.append(ScalingGroup("v-o", v, [layout.o], layout.o, prev_rows=(0, v_out)))
        no_clip = {q, k}
    groups.append(mlp)
    if moe is None:
        up = layout.gate_up[-1]
        groups.append(ScalingGroup("up-down", up, [layout.down], layout.down, prev_rows=(0, linear(up)[0])))
    for _, up, down in moe.units if moe else ():
        unit = up.rsplit(".", 1)[0]
        groups.append(ScalingGroup(f"up-down {unit}", up, [down], down, prev_rows=(0, linear(up)[0]),
                                   unit=unit))
    return BlockPlan(groups, no_clip=no_clip)


def _fused_plan(layout: BlockLayout, linear: LinearShape, heads: Heads, norm_offset: float) -> BlockPlan:
    (qkv,), (gate_up,) = layout.qkv, layout.gate_up
    qkv_out, o_in = linear(qkv)[0], linear(layout.o)[1]
    gate_up_out, down_in = linear(gate_up)[0], linear(layout.down)[1]
    n_head, n_kv, hd = heads()
    v_rows = (n_head * hd + n_kv * hd, qkv_out)  # fused as [q; k; v]
    if v_rows[1] - v_rows[0] != n_kv * hd:
        raise BadInput(f"--method awq: {qkv} has {qkv_out} rows, the config implies "
                       f"{(n_head + 2 * n_kv) * hd}")
    attn, mlp = norm_groups(layout, norm_offset)
    groups = [attn]
    if v_rows[1] - v_rows[0] == o_in:
        groups.append(ScalingGroup("v-o", qkv, [layout.o], layout.o, prev_rows=v_rows))
    half = gate_up_out // 2  # fused as [gate; up]: the up half multiplies act(gate)
    groups += [mlp, ScalingGroup("up-down", gate_up, [layout.down], layout.down,
                                 prev_rows=(half, gate_up_out))]
    if down_in != half:
        raise BadInput(f"--method awq: {layout.down} takes {down_in} inputs, {gate_up} gives {half}")
    return BlockPlan(groups, clip_rows={qkv: v_rows})
