"""The network, its KV cache, its tokenizer and the on-disk bundle format."""

from .bundle import Bundle, BundleError, load_bundle, save_bundle
from .config import ConfigError, GPTConfig, preset
from .gpt import GPT, GPTOutput, StepOutput
from .kv_cache import KVCache
from .tokenizer import IncrementalDetokenizer, Tokenizer

__all__ = ["GPT", "GPTConfig", "GPTOutput", "StepOutput", "KVCache", "Tokenizer", "IncrementalDetokenizer",
           "Bundle", "BundleError", "ConfigError", "load_bundle", "save_bundle", "preset"]
