"""The gpt-oss architecture's hyper-parameters, the presets we build random checkpoints from,
and their translation to and from both on-disk config formats (`original/config.json`, HF `config.json`)."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Any

# The 16 fields of `original/config.json`, in the order OpenAI writes them. The reference loader
# rejects any other key, so `to_original_json` writes exactly these.
ORIGINAL_FIELDS = (
    "num_hidden_layers", "num_experts", "experts_per_token", "vocab_size", "hidden_size",
    "intermediate_size", "swiglu_limit", "head_dim", "num_attention_heads", "num_key_value_heads",
    "sliding_window", "initial_context_length", "rope_theta", "rope_scaling_factor",
    "rope_ntk_alpha", "rope_ntk_beta",
)

# The fields the weights' shapes follow from. A config.json without them describes no particular model (an empty
# `{}` would otherwise be read as the 20b defaults and fail later on the weights), so both readers require them.
SHAPE_FIELDS = (
    "num_hidden_layers", "num_experts", "vocab_size", "hidden_size", "intermediate_size", "head_dim",
    "num_attention_heads", "num_key_value_heads",
)
# The same fields under their Hugging Face names (HF derives head_dim from hidden_size / num_attention_heads).
HF_SHAPE_KEYS = (
    "num_hidden_layers", "num_local_experts", "vocab_size", "hidden_size", "intermediate_size",
    "num_attention_heads", "num_key_value_heads",
)

HARMONY_VOCAB_SIZE = 201088
MAX_CONTEXT = 131072


class ConfigError(ValueError):
    """A config's content that cannot describe a gpt-oss model (a missing shape field, a string where a number
    belongs, a zero or infinite size); the one who read the file adds its name."""


@dataclass(frozen=True, slots=True)
class ModelConfig:
    num_hidden_layers: int = 24
    num_experts: int = 32
    experts_per_token: int = 4
    vocab_size: int = HARMONY_VOCAB_SIZE
    hidden_size: int = 2880
    intermediate_size: int = 2880
    swiglu_limit: float = 7.0
    head_dim: int = 64
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    sliding_window: int = 128
    initial_context_length: int = 4096
    rope_theta: float = 150000.0
    rope_scaling_factor: float = 32.0
    rope_ntk_alpha: float = 1.0
    rope_ntk_beta: float = 32.0
    rms_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        for f in dataclasses.fields(self):
            if f.type in ("int", "float"):
                _number(f.name, getattr(self, f.name), f.type)
        if self.hidden_size % 32 or self.intermediate_size % 32:
            raise ConfigError("hidden_size and intermediate_size must be multiples of the 32-value MXFP4 block")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads")
        if not 0 < self.experts_per_token <= self.num_experts:
            raise ConfigError("experts_per_token must be in 1..num_experts")
        if self.head_dim % 2:
            raise ConfigError("head_dim must be even (RoPE rotates halves)")
        if self.sliding_window >= MAX_CONTEXT:
            raise ConfigError(f"sliding_window must be less than the model's context of {MAX_CONTEXT} tokens (gpt-oss's "
                              f"is 128), not {self.sliding_window}")
        if self.initial_context_length > MAX_CONTEXT:
            raise ConfigError(f"initial_context_length must be at most {MAX_CONTEXT} (gpt-oss's is 4096), not "
                              f"{self.initial_context_length}")

    # -- derived sizes ------------------------------------------------------------------------
    @property
    def q_size(self) -> int:
        return self.num_attention_heads * self.head_dim

    @property
    def kv_size(self) -> int:
        return self.num_key_value_heads * self.head_dim

    @property
    def max_context(self) -> int:
        """Positions the RoPE tables cover: YaRN stretches the 4096 trained positions by the factor."""
        return int(self.initial_context_length * self.rope_scaling_factor)

    @property
    def served_name(self) -> str:
        """The name the API answers to, derived from the shape in this one place for both config formats (hunt round
        22 B-F1: a 120b checkpoint answered and was priced as the 20b): gpt-oss-120b's layer and expert counts answer
        as the 120b; everything else (the 20b, the demo, the tiny test models) as the 20b, the hosted model the
        clients of the small ones are written for."""
        big = PRESETS["120b"]
        if (self.num_hidden_layers, self.num_experts) == (big.num_hidden_layers, big.num_experts):
            return "@cf/openai/gpt-oss-120b"
        return "@cf/openai/gpt-oss-20b"

    def is_sliding(self, layer: int) -> bool:
        """Even layers attend within the sliding window, odd layers to the full context."""
        return layer % 2 == 0

    def layer_types(self) -> list[str]:
        """HF's `layer_types`: the attention of each layer, as `is_sliding` says."""
        return ["sliding_attention" if self.is_sliding(i) else "full_attention" for i in range(self.num_hidden_layers)]

    # -- original/config.json -----------------------------------------------------------------
    def to_original_json(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in ORIGINAL_FIELDS}

    @classmethod
    def from_original_json(cls, data: Any) -> "ModelConfig":
        """A ConfigError for anything that is not an object with the shape fields, of the right types."""
        data = _object(data)
        _require(data, SHAPE_FIELDS)
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    # -- Hugging Face config.json -------------------------------------------------------------
    def to_hf_json(self) -> dict[str, Any]:
        return {
            "architectures": ["GptOssForCausalLM"],
            "model_type": "gpt_oss",
            "num_hidden_layers": self.num_hidden_layers,
            "num_local_experts": self.num_experts,
            "num_experts_per_tok": self.experts_per_token,
            "experts_per_token": self.experts_per_token,
            "vocab_size": self.vocab_size,
            "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size,
            "swiglu_limit": self.swiglu_limit,
            "head_dim": self.head_dim,
            "num_attention_heads": self.num_attention_heads,
            "num_key_value_heads": self.num_key_value_heads,
            "sliding_window": self.sliding_window,
            "initial_context_length": self.initial_context_length,
            "max_position_embeddings": MAX_CONTEXT,
            "rope_theta": self.rope_theta,
            "rope_scaling": {
                "rope_type": "yarn",
                "factor": self.rope_scaling_factor,
                "beta_fast": self.rope_ntk_beta,
                "beta_slow": self.rope_ntk_alpha,
                "original_max_position_embeddings": self.initial_context_length,
                "truncate": False,
            },
            "layer_types": self.layer_types(),
            "rms_norm_eps": self.rms_norm_eps,
            "attention_bias": True,
            "attention_dropout": 0.0,
            "hidden_act": "silu",
            "tie_word_embeddings": False,
            "router_aux_loss_coef": 0.9,
            "output_router_logits": False,
            "use_cache": True,
            "initializer_range": 0.02,
            # Harmony's <|return|> and <|endoftext|>; absent for vocabularies too small to hold them.
            "eos_token_id": 200002 if self.vocab_size > 200002 else None,
            "pad_token_id": 199999 if self.vocab_size > 199999 else None,
            "torch_dtype": "bfloat16",
            "quantization_config": {
                "quant_method": "mxfp4",
                "modules_to_not_convert": [
                    "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens", "lm_head",
                ],
            },
        }

    @classmethod
    def from_hf_json(cls, data: Any) -> "ModelConfig":
        """As `from_original_json`, from the Hugging Face names (the same shape fields required)."""
        data = _object(data)
        _require(data, HF_SHAPE_KEYS)
        rope = data.get("rope_scaling") or {}
        if not isinstance(rope, dict):
            raise ConfigError(f"rope_scaling must be an object, not {rope!r}")
        _refuse_other_models(data, rope)
        if "head_dim" not in data:
            for key in ("hidden_size", "num_attention_heads"):
                _number(key, data[key], "int")
        config = cls(
            num_hidden_layers=data["num_hidden_layers"],
            num_experts=data["num_local_experts"],
            experts_per_token=data.get("num_experts_per_tok", data.get("experts_per_token", 4)),
            vocab_size=data["vocab_size"],
            hidden_size=data["hidden_size"],
            intermediate_size=data["intermediate_size"],
            swiglu_limit=data.get("swiglu_limit", 7.0),
            head_dim=data.get("head_dim", data["hidden_size"] // data["num_attention_heads"]),
            num_attention_heads=data["num_attention_heads"],
            num_key_value_heads=data["num_key_value_heads"],
            sliding_window=data.get("sliding_window", 128),
            initial_context_length=rope.get("original_max_position_embeddings", data.get("initial_context_length", 4096)),
            rope_theta=data.get("rope_theta", 150000.0),
            rope_scaling_factor=rope.get("factor", 32.0),
            rope_ntk_alpha=rope.get("beta_slow", 1.0),
            rope_ntk_beta=rope.get("beta_fast", 32.0),
            rms_norm_eps=data.get("rms_norm_eps", 1e-5),
        )
        _check_layer_types(data.get("layer_types"), config)
        return config

    def replace(self, **changes: Any) -> "ModelConfig":
        return dataclasses.replace(self, **changes)


def _refuse_other_models(data: dict[str, Any], rope: dict[str, Any]) -> None:
    """HF keys that ossrun does not follow but would contradict: a config with them is another model (or a hand
    edit), which ossrun would run as gpt-oss and so give other logits than transformers does without a word."""
    model_type = data.get("model_type", "gpt_oss")
    if model_type != "gpt_oss":
        raise ConfigError(f"model_type must be gpt_oss, not {model_type!r}: ossrun runs gpt-oss models only")
    rope_type = rope.get("rope_type", rope.get("type", "yarn"))
    if rope_type != "yarn":
        raise ConfigError(f"rope_scaling.rope_type must be yarn (gpt-oss's RoPE, the one ossrun runs), not {rope_type!r}")
    trained = rope.get("original_max_position_embeddings", 4096)
    if not (_is_number(trained, "int") and 0 < trained <= MAX_CONTEXT):
        raise ConfigError(f"rope_scaling.original_max_position_embeddings must be an integer in 1..{MAX_CONTEXT} "
                          f"(gpt-oss's is 4096), not {trained!r}")


def _check_layer_types(layer_types: Any, config: ModelConfig) -> None:
    """HF's per-layer attention kinds, where given, are the ones ossrun runs (it alternates by index)."""
    expected = config.layer_types()
    if layer_types is None or layer_types == expected:
        return
    if not isinstance(layer_types, list):
        raise ConfigError(f"layer_types must be a list, not {layer_types!r}")
    differs = next((i for i, (a, b) in enumerate(zip(layer_types, expected)) if a != b), min(len(layer_types), len(expected)))
    raise ConfigError(f"layer_types must be sliding_attention on even layers and full_attention on odd ones, one per "
                      f"layer (the pattern ossrun runs); it differs at layer {differs}")


def _is_number(value: Any, kind: str) -> bool:
    """JSON's true is a Python int, and an int is a fine float (`"rope_theta": 150000` in OpenAI's own file)."""
    if isinstance(value, bool):
        return False
    return isinstance(value, int) if kind == "int" else isinstance(value, (int, float))


def _number(key: str, value: Any, kind: str) -> None:
    if not (_is_number(value, kind) and 0 < value < math.inf):
        raise ConfigError(f"{key} must be {'an integer' if kind == 'int' else 'a number'} greater than 0, not {value!r}")


def _object(data: Any) -> dict[str, Any]:
    if not isinstance(data, dict):
        kind = {list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(type(data), "a number")
        raise ConfigError(f"not a gpt-oss config: {kind}, not a JSON object")
    return data


def _require(data: dict[str, Any], keys: tuple[str, ...]) -> None:
    missing = [key for key in keys if key not in data]
    if missing:
        raise ConfigError(f"not a gpt-oss config: it lacks {', '.join(missing)} (the fields the weights' shapes follow from)")


PRESETS: dict[str, ModelConfig] = {
    # Seconds to write; the full harmony vocabulary so the server can speak harmony with it.
    "tiny": ModelConfig(
        num_hidden_layers=4, num_experts=8, experts_per_token=4, hidden_size=64, intermediate_size=64,
        head_dim=16, num_attention_heads=8, num_key_value_heads=2,
    ),
    # Big enough that batching and the MoE matter, small enough for a 2-core benchmark.
    "small": ModelConfig(
        num_hidden_layers=8, num_experts=32, experts_per_token=4, hidden_size=512, intermediate_size=512,
        head_dim=64, num_attention_heads=16, num_key_value_heads=4,
    ),
    "20b": ModelConfig(),
    "120b": ModelConfig(num_hidden_layers=36, num_experts=128),
}


def yarn_parameters(config: ModelConfig) -> tuple[float, float, float]:
    """(concentration, low, high) of YaRN's NTK-by-parts ramp, as the reference computes them."""
    factor = config.rope_scaling_factor
    if factor <= 1.0:
        return 1.0, 0.0, 0.0
    d_half = config.head_dim / 2
    log_base = math.log(config.rope_theta)
    low = d_half * math.log(config.initial_context_length / (config.rope_ntk_beta * 2 * math.pi)) / log_base
    high = d_half * math.log(config.initial_context_length / (config.rope_ntk_alpha * 2 * math.pi)) / log_base
    return 0.1 * math.log(factor) + 1.0, low, high
