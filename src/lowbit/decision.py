"""Why each node is quantized or stays float, as data: a reason code, the details it needs, and the sentence people
read, rendered from the two. Code branches on codes; only people read the sentences.

A new reason is one member of `Reason` and one template in `TEMPLATES` (a test checks every member has one).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class Reason(StrEnum):
    # The recipe decided.
    EXCLUDED_NAME = "excluded_name"
    EXCLUDED_OP_TYPE = "excluded_op_type"
    RULE_FLOAT = "rule_float"  # a rule without a scheme
    MODE_FLOAT = "mode_float"
    # Static planning.
    STATIC = "static"
    SHARES_SCALE = "shares_scale"
    FOLDED = "folded"
    FEEDS_ONLY_FLOAT = "feeds_only_float"
    ISOLATED_DATA_MOVEMENT = "isolated_data_movement"
    ISOLATED = "isolated"
    SENTINEL = "sentinel"
    MIXED_RANGES = "mixed_ranges"
    CARRIES_MIXED = "carries_mixed"
    NO_QUANTIZED_FORM = "no_quantized_form"
    CUSTOM_DOMAIN = "custom_domain"
    INTEGER_ONLY = "integer_only"
    OTHER_FLOAT = "other_float"
    STATIC_ATTENTION = "static_attention"
    REQUANTIZED_GATE = "requantized_gate"  # onnxruntime target: HardSwish/HardSigmoid as Q/DQ (+ QLinearMul)
    IMAGE_STEM = "image_stem"  # onnxruntime target: a Conv on a 3-channel input (and its activation) stays float
    # What one op's inputs rule out.
    NOT_FLOAT32 = "not_float32"
    WEIGHT_NOT_CONSTANT = "weight_not_constant"
    BIAS_NOT_CONSTANT = "bias_not_constant"
    TRANS_A = "trans_a"
    WEIGHT_RANK = "weight_rank"
    EMPTY_WEIGHT = "empty_weight"
    NONFINITE_WEIGHT = "nonfinite_weight"
    CONSTANT_LHS = "constant_lhs"
    COMPUTED_C = "computed_c"
    RHS_COMPUTED = "rhs_computed"
    GATHER_COMPUTED = "gather_computed"
    GATHER_NOT_MATRIX = "gather_not_matrix"
    GATHER_AXIS = "gather_axis"
    CLIP_BOUNDS = "clip_bounds"
    MAXPOOL_INDICES = "maxpool_indices"
    CUBIC_RESIZE = "cubic_resize"
    PAD_VALUE = "pad_value"
    # Dynamic, weight-only and float16 modes.
    DYNAMIC_MATMUL = "dynamic_matmul"
    DYNAMIC_LSTM = "dynamic_lstm"
    DYNAMIC_ATTENTION = "dynamic_attention"
    WEIGHT_ONLY = "weight_only"
    WEIGHT_ONLY_INT4 = "weight_only_int4"
    FLOAT16 = "float16"
    CONV_DYNAMIC = "conv_dynamic"
    DYNAMIC_OTHER = "dynamic_other"
    NO_WEIGHTS = "no_weights"
    FP16_FRAGILE = "fp16_fragile"
    FP16_NO_FORM = "fp16_no_form"
    FP16_MIXED_TYPES = "fp16_mixed_types"
    LSTM_NOT_DYNAMIC = "lstm_not_dynamic"
    LSTM_ASYMMETRIC = "lstm_asymmetric"
    LSTM_DOMAIN = "lstm_domain"
    LSTM_BATCH_FIRST = "lstm_batch_first"
    LSTM_WEIGHT = "lstm_weight"
    NO_RECURRENT_KERNEL = "no_recurrent_kernel"
    RECURRENT_NOT_IMPLEMENTED = "recurrent_not_implemented"
    ATTENTION_NOT_DYNAMIC = "attention_not_dynamic"
    ATTENTION_WEIGHT_TYPE = "attention_weight_type"
    ATTENTION_INPUT = "attention_input"
    ATTENTION_WEIGHT = "attention_weight"
    ATTENTION_EXTRA_INPUT = "attention_extra_input"
    ATTENTION_PRESENT = "attention_present"
    ATTENTION_QKV_SIZES = "attention_qkv_sizes"
    ATTENTION_ROTARY = "attention_rotary"
    ATTENTION_SHARED_BUFFER = "attention_shared_buffer"
    # Plans written by lowbit 0.1 (version 1) stored only the sentence.
    LEGACY = "legacy"


TEMPLATES: dict[Reason, str] = {
    Reason.EXCLUDED_NAME: "excluded by name",
    Reason.EXCLUDED_OP_TYPE: "excluded op type {op}",
    Reason.RULE_FLOAT: "{rule}",
    Reason.MODE_FLOAT: "kept float ({rule}: mode float)",
    Reason.STATIC: "{activations} activations",
    Reason.SHARES_SCALE: "shares its input's scale",
    Reason.FOLDED: "folded into the output range of {into}",
    Reason.FEEDS_ONLY_FLOAT: "its output feeds only float ops (nothing to gain, only rounding)",
    Reason.ISOLATED_DATA_MOVEMENT: "data movement between float ops (nothing to gain)",
    Reason.ISOLATED: "no quantized op feeds or reads it (nothing to gain, only rounding)",
    Reason.SENTINEL: "calibrated range reaches {edge:.3g} at '{tensor}' (observed, or a mask constant upstream): a "
    "value this large (a mask's sentinel, or an extreme such as the cube in a tanh GELU) would stretch any 8- or "
    "16-bit grid past the rest of the values; kept float",
    Reason.MIXED_RANGES: "input '{tensor}' spans {span:.3g}, only {steps:.3g} steps of the output's scale (output "
    "spans {output_span:.3g}; fewer than {min_steps} steps loses it): ranges too different for one scale; kept float, "
    "each input keeps its own",
    Reason.CARRIES_MIXED: "'{tensor}' carries the values of '{concat}', kept float for mixed ranges: one scale "
    "would round its small-range part away; kept float",
    Reason.NO_QUANTIZED_FORM: "no quantized form for {op} in lowbit",
    Reason.CUSTOM_DOMAIN: "custom-domain op {domain}::{op} has no quantized form",
    Reason.INTEGER_ONLY: "integer {op} (shape arithmetic): nothing to quantize",
    Reason.OTHER_FLOAT: "{op} computes in {dtype}: lowbit quantizes float32 tensors",
    Reason.REQUANTIZED_GATE: "{activations} activations; for ONNX Runtime {op} runs as a requantization onto the "
    "gate's 1/255 grid (times x as QLinearMul for HardSwish), not in float",
    Reason.IMAGE_STEM: "image stem ({channels} input channels{after}): ONNX Runtime's float convolution is faster "
    "there than its integer one, and quantizing the input costs a pass of its own; kept float",
    Reason.STATIC_ATTENTION: "static com.microsoft::Attention: ONNX Runtime's integer attention (QAttention) is "
    "dynamic; use mode dynamic for it",
    Reason.NOT_FLOAT32: "input '{input}' is {dtype}, not float32",
    Reason.WEIGHT_NOT_CONSTANT: "weight is not a constant (computed at run time)",
    Reason.BIAS_NOT_CONSTANT: "bias is not a constant",
    Reason.TRANS_A: "transA=1 is not quantized (fold the transpose into the producer first)",
    Reason.WEIGHT_RANK: "weight has rank {rank}, expected 2",
    Reason.EMPTY_WEIGHT: "weight is empty (shape {shape}): nothing to quantize",
    Reason.NONFINITE_WEIGHT: "a constant input holds {count} NaN or infinite values of {size} (a mask's -inf?): "
    "no finite scale spans them",
    Reason.CONSTANT_LHS: "constant left-hand side is not quantized",
    Reason.COMPUTED_C: "Gemm with a computed C and beta != 1 is not quantized",
    Reason.RHS_COMPUTED: "right-hand side is computed at run time (no constant weight)",
    Reason.GATHER_COMPUTED: "Gather data is computed at run time (not an embedding table)",
    Reason.GATHER_NOT_MATRIX: "Gather table is {dtype} of rank {rank}, not a float matrix",
    Reason.GATHER_AXIS: "Gather along axis != 0 is not a row lookup",
    Reason.CLIP_BOUNDS: "Clip bounds are not constants",
    Reason.MAXPOOL_INDICES: "MaxPool indices output is used",
    Reason.CUBIC_RESIZE: "cubic Resize overshoots its input range; it stays float",
    Reason.PAD_VALUE: "Pad with a non-zero constant value keeps float",
    Reason.DYNAMIC_MATMUL: "dynamic int8: uint8 activations quantized per input at run time, int8 {granularity} "
    "weights",
    Reason.DYNAMIC_LSTM: "dynamic int8 (DynamicQuantizeLSTM): input and hidden state quantized per step at run time, "
    "int8 {granularity} W and R",
    Reason.DYNAMIC_ATTENTION: "dynamic int8 (QAttention): uint8 input quantized per input at run time, int8 "
    "{granularity} Q/K/V weights",
    Reason.WEIGHT_ONLY: "weight-only {weights} {granularity} weights, float activations",
    Reason.WEIGHT_ONLY_INT4: "weight-only int4 {symmetry} blocks of {block} ({how}), float activations",
    Reason.FLOAT16: "float16 weights and compute",
    Reason.CONV_DYNAMIC: "dynamic quantization of convolutions is several times slower than float on x86 "
    "(ConvInteger); "
    "give calibration data to quantize them statically",
    Reason.DYNAMIC_OTHER: "dynamic mode quantizes LSTM, com.microsoft Attention, MatMul/Gemm and embedding tables "
    "only; "
    "{op} stays float",
    Reason.NO_WEIGHTS: "weight-only mode: {op} has no weights to quantize",
    Reason.FP16_FRAGILE: "numerically fragile in float16: {op} stays float32",
    Reason.FP16_NO_FORM: "no float16 form for {op} in lowbit: stays float32",
    Reason.FP16_MIXED_TYPES: "{op} has a non-float32 floating-point input or output",
    Reason.LSTM_NOT_DYNAMIC: "{mode} LSTM: ONNX Runtime's only integer LSTM is dynamic (DynamicQuantizeLSTM); use mode "
    "dynamic",
    Reason.LSTM_ASYMMETRIC: "DynamicQuantizeLSTM takes only zero weight zero points: set symmetric_weights true for "
    "LSTM",
    Reason.LSTM_DOMAIN: "LSTM in domain {domain} is not the ONNX LSTM",
    Reason.LSTM_BATCH_FIRST: "LSTM with layout=1 (batch first): DynamicQuantizeLSTM only takes [seq, batch, input]",
    Reason.LSTM_WEIGHT: "LSTM weight {what} is not a constant 3-D tensor",
    Reason.NO_RECURRENT_KERNEL: "ONNX Runtime has no dynamic integer {op} kernel (only DynamicQuantizeLSTM); {op} "
    "stays "
    "float",
    Reason.RECURRENT_NOT_IMPLEMENTED: "{mode} {op} is not implemented in lowbit yet",
    Reason.ATTENTION_NOT_DYNAMIC: "{mode} Attention: ONNX Runtime's only integer attention is dynamic (QAttention); "
    "use mode dynamic",
    Reason.ATTENTION_WEIGHT_TYPE: "QAttention takes int8 weights; {weights} Attention weights are not supported",
    Reason.ATTENTION_INPUT: "Attention input is not float32 (DynamicQuantizeLinear quantizes float32 only)",
    Reason.ATTENTION_WEIGHT: "Attention weight is not a constant 2-D tensor: QAttention needs int8 weights stored in "
    "the "
    "model; stays float",
    Reason.ATTENTION_EXTRA_INPUT: "Attention with {what} (input {index}): lowbit's QAttention form takes none; stays "
    "float",
    Reason.ATTENTION_PRESENT: "Attention with a present (key/value cache) output: lowbit's QAttention form takes none; "
    "stays float",
    Reason.ATTENTION_QKV_SIZES: "Attention with unequal qkv_hidden_sizes {sizes}: QAttention has no such attribute; "
    "stays float",
    Reason.ATTENTION_ROTARY: "Attention with rotary_embedding_dim: QAttention has no such attribute; stays float",
    Reason.ATTENTION_SHARED_BUFFER: "Attention with past_present_share_buffer: lowbit's QAttention form takes no "
    "cache; "
    "stays float",
    Reason.LEGACY: "{text}",
}


def render(code: Reason, details: dict[str, Any]) -> str:
    """The sentence for a reason code and its details."""
    if code is Reason.STATIC and "weights" in details:
        return f"{details['activations']} activations, {details['weights']} {details['granularity']} weights"
    return TEMPLATES[code].format(**details)


@dataclass(frozen=True)
class RuleMatch:
    """Which part of a recipe decided a node's scheme: "default", "rule" (with its index), "exclude_names" or
    "exclude_op_types"; `text` says it for people ("rule 0 rule(names=['head/*'])")."""

    by: str = "default"
    index: int | None = None
    text: str = "default"


@dataclass
class Decision:
    """One node's fate, as the plan stores it: quantized or not, in which mode, why (a code and its details) and
    what in the recipe decided. `reason` is the sentence rendered from code and details."""

    op_type: str
    quantized: bool
    code: Reason
    details: dict[str, Any] = field(default_factory=dict)
    mode: str = "float"
    rule: str = "default"
    rule_index: int | None = None
    decided_by: str = "default"

    @property
    def reason(self) -> str:
        return render(self.code, self.details)

    def to_dict(self) -> dict[str, Any]:
        return {
            "op_type": self.op_type,
            "quantized": self.quantized,
            "mode": self.mode,
            "code": self.code.value,
            "details": self.details,
            "reason": self.reason,
            "rule": self.rule,
            "rule_index": self.rule_index,
            "decided_by": self.decided_by,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Decision:
        return cls(
            d["op_type"],
            bool(d["quantized"]),
            Reason(d["code"]),
            dict(d.get("details") or {}),
            d.get("mode", "float"),
            d.get("rule", "default"),
            d.get("rule_index"),
            d.get("decided_by", "default"),
        )


def granularity(per_channel: bool, per_channel_word: str = "per-channel") -> str:
    return per_channel_word if per_channel else "per-tensor"
