"""Byte-level BPE tokenizer with DeepSeek's special tokens and the V3.1 hybrid-thinking chat template.

- Training: HF `tokenizers` BPE over bytes (every string, English or Chinese, encodes without unknowns),
  pre-tokenized like DeepSeek-V3: digits in groups of at most 3, CJK runs apart from Latin letters,
  then GPT-2's byte-level regex. Deterministic for the same input.
- Special tokens, with DeepSeek's spelling (bars U+FF5C, underscores U+2581) and its bos 0 / eos 1:
  0 BOS, 1 EOS, 2 PAD, 3 `<｜User｜>`, 4 `<｜Assistant｜>`, 5 `<think>`, 6 `</think>`.
  As in DeepSeek-V3.1's tokenizer, `<think>` / `</think>` are added tokens that are *not* special:
  they are never split, but `decode(..., skip_special_tokens=True)` keeps them, so the reasoning of a
  decoded completion can still be found (`parse_completion`).
- Chat (V3.1 hybrid thinking): BOS, the system prompt(s) joined by a blank line, then
  `<｜User｜>{content}` per user turn and `<｜Assistant｜></think>{content}<｜end▁of▁sentence｜>` per assistant
  turn; reasoning of earlier turns is dropped. The generation prompt is `<｜Assistant｜><think>` (thinking)
  or `<｜Assistant｜></think>` (non-thinking). A final assistant turn rendered with thinking=True keeps its
  reasoning: `<｜Assistant｜><think>{reasoning}</think>{content}<｜end▁of▁sentence｜>`, so the generation
  prompt is always a prefix of the rendered training sample.
- `save` writes a Hugging Face tokenizer folder; `transformers.AutoTokenizer` loads it and its Jinja
  `chat_template` gives the same ids as `Tokenizer.apply_chat_template` (tested).

Simplifications against DeepSeek-V3.1's template: no tool calls, no `prefix` continuation, an
assistant tag for every assistant turn (DeepSeek omits it for consecutive assistant turns).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterable, Sequence

import tokenizers
from tokenizers import AddedToken, Regex, decoders, models, pre_tokenizers, trainers

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
PAD = "<｜▁pad▁｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK = "<think>"
END_THINK = "</think>"
SPECIAL_TOKENS = (BOS, EOS, PAD, USER, ASSISTANT, THINK, END_THINK)  # ids 0..6 in a trained tokenizer
NON_SPECIAL_ADDED = (THINK, END_THINK)  # kept by decode(skip_special_tokens=True), as in DeepSeek-V3.1
ROLES = ("system", "user", "assistant")

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"

# DeepSeek-V3's pre-tokenizer splits digits into groups of <= 3 and CJK runs from neighbouring letters.
_DIGITS = r"\p{N}{1,3}"
_CJK = "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"

# The Jinja twin of render_chat. transformers renders it with trim_blocks/lstrip_blocks; written on
# one logical line per statement with `{%-` so no stray whitespace reaches the output.
CHAT_TEMPLATE = (
    "{%- if thinking is not defined %}{%- set thinking = false %}{%- endif %}"
    "{%- if keep_last_reasoning is not defined %}{%- set keep_last_reasoning = true %}{%- endif %}"
    "{%- set ns = namespace(system='', first=true) %}"
    "{%- for m in messages %}{%- if m['role'] == 'system' %}"
    "{%- if ns.first %}{%- set ns.system = m['content'] %}{%- set ns.first = false %}"
    "{%- else %}{%- set ns.system = ns.system + '\\n\\n' + m['content'] %}{%- endif %}"
    "{%- endif %}{%- endfor %}"
    "{{- '" + BOS + "' + ns.system }}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'user' %}{{- '" + USER + "' + m['content'] }}"
    "{%- elif m['role'] == 'assistant' %}"
    "{%- set content = m['content'] %}"
    "{%- if '" + END_THINK + "' in content %}{%- set content = content.split('" + END_THINK + "', 1)[1] %}{%- endif %}"
    "{%- if loop.last and thinking and keep_last_reasoning %}"
    "{%- set reasoning = m['reasoning_content'] if m['reasoning_content'] is defined"
    " and m['reasoning_content'] is not none else '' %}"
    "{{- '" + ASSISTANT + THINK + "' + reasoning + '" + END_THINK + "' + content + '" + EOS + "' }}"
    "{%- else %}{{- '" + ASSISTANT + END_THINK + "' + content + '" + EOS + "' }}{%- endif %}"
    "{%- elif m['role'] != 'system' %}{{- raise_exception('unknown chat role: ' + m['role']) }}"
    "{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}"
    "{{- '" + ASSISTANT + "' + ('" + THINK + "' if thinking else '" + END_THINK + "') }}"
    "{%- endif %}"
)


def _atomic_write_text(path: str, text: str) -> None:
    """Write text to path via a temp file in the same folder + os.replace, so a crash never leaves half a file."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=os.path.basename(path))
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def validate_messages(messages, where: str = "messages") -> None:
    """Raise ValueError naming `where` and the message index if messages is not a valid chat."""
    if not isinstance(messages, (list, tuple)) or len(messages) == 0:
        raise ValueError(f"{where}: must be a non-empty list of messages, got {type(messages).__name__}")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"{where}[{i}]: each message must be a dict, got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}[{i}].role must be one of {'/'.join(ROLES)}, got {role!r}")
        if not isinstance(m.get("content"), str):
            raise ValueError(f"{where}[{i}].content must be a string, got {type(m.get('content')).__name__}")
        reasoning = m.get("reasoning_content")
        if reasoning is not None and (role != "assistant" or not isinstance(reasoning, str)):
            raise ValueError(f"{where}[{i}].reasoning_content must be a string on an assistant turn, got "
                             f"{type(reasoning).__name__} on a {role} turn")


# Piece kinds of a rendered chat: what a loss mask would do with each piece.
_PROMPT, _FINAL, _HISTORY = 0, 1, 2


def _render_pieces(messages, thinking: bool, add_generation_prompt: bool, keep_last_reasoning: bool):
    """The rendered chat as (text, kind, is_text) pieces: is_text marks what the caller wrote (system, user and
    assistant content, reasoning), the rest is the template's own markup. Every boundary between pieces falls
    at a special/added token, so encoding the pieces one by one gives the same ids as encoding their join
    (when the text holds no special-token strings)."""
    validate_messages(messages)
    system = "\n\n".join(m["content"] for m in messages if m["role"] == "system")
    pieces = [(BOS, _PROMPT, False), (system, _PROMPT, True)]
    last = len(messages) - 1
    for i, m in enumerate(messages):
        if m["role"] == "user":
            pieces += [(USER, _PROMPT, False), (m["content"], _PROMPT, True)]
        elif m["role"] == "assistant":
            content = m["content"]
            if END_THINK in content:  # reasoning left inside content is dropped too (DeepSeek's template)
                content = content.split(END_THINK, 1)[1]
            if i == last and thinking and keep_last_reasoning:
                pieces.append((ASSISTANT + THINK, _PROMPT, False))
                pieces += [(m.get("reasoning_content") or "", _FINAL, True), (END_THINK, _FINAL, False),
                           (content, _FINAL, True), (EOS, _FINAL, False)]
            else:  # history turn (or non-thinking final turn): empty think, reasoning dropped
                kind = _FINAL if i == last else _HISTORY
                pieces += [(ASSISTANT + END_THINK, _PROMPT, False), (content, kind, True), (EOS, kind, False)]
    if add_generation_prompt:
        pieces.append((ASSISTANT + (THINK if thinking else END_THINK), _PROMPT, False))
    return [p for p in pieces if p[0]]


def render_chat(messages, thinking: bool = False, add_generation_prompt: bool = True,
                keep_last_reasoning: bool = True) -> str:
    """The V3.1 hybrid-thinking prompt string for a list of {role, content, [reasoning_content]} dicts.

    keep_last_reasoning: with thinking=True, a final assistant turn keeps its reasoning_content inside
    `<think>...</think>` (a training sample); with False it is rendered like a history turn.
    """
    return "".join(p[0] for p in _render_pieces(messages, thinking, add_generation_prompt, keep_last_reasoning))


def parse_completion(text: str, thinking: bool = True) -> tuple[str, str]:
    """Split a generated completion into (reasoning, answer) at the first `</think>`.

    The reasoning is what precedes `</think>`, without a leading `<think>`; the answer is what follows,
    without a trailing EOS. Both are stripped of surrounding whitespace. With no `</think>` the whole
    text is reasoning when the prompt opened thinking (the model never closed it: a truncated or
    malformed completion), else it is the answer.
    """
    text = text.strip()
    if text.endswith(EOS):
        text = text[: -len(EOS)]
    if END_THINK in text:
        reasoning, answer = text.split(END_THINK, 1)
    elif thinking:
        reasoning, answer = text, ""
    else:
        reasoning, answer = "", text
    reasoning = reasoning.strip()
    if reasoning.startswith(THINK):
        reasoning = reasoning[len(THINK):]
    return reasoning.strip(), answer.strip()


class Tokenizer:
    """A `tokenizers.Tokenizer` plus DeepSeek's special tokens and chat template."""

    def __init__(self, tokenizer: tokenizers.Tokenizer, model_max_length: int = 131072, config: dict | None = None):
        """config: the folder's tokenizer_config.json, if any. A tokenizer without DeepSeek's special tokens (say a
        Qwen2 or character tokenizer) works for raw text: bos/eos/pad then come from config's bos_token /
        eos_token / pad_token (pad falls back to eos, then 0), and only the chat template errors (`has_chat_template`)."""
        self.tokenizer = tokenizer
        self.model_max_length = model_max_length
        self.config = dict(config or {})
        self._ids = {}
        for token in SPECIAL_TOKENS:  # looked up by string, so a real DeepSeek tokenizer.json works too
            self._ids[token] = tokenizer.token_to_id(token)  # None when absent (a non-DeepSeek tokenizer)
        self.has_chat_template = all(v is not None for v in self._ids.values())
        for token, key in ((BOS, "bos_token"), (EOS, "eos_token"), (PAD, "pad_token")):
            if self._ids[token] is None:
                self._ids[token] = self._config_token_id(key)
        if self._ids[PAD] is None:
            self._ids[PAD] = self._ids[EOS] if self._ids[EOS] is not None else 0  # padding is masked anyway
        # raw text gets a BOS only when the tokenizer's own config adds one (see encode_prompt)
        self.add_bos_token = bool(self.config.get("add_bos_token", False))
        # The same tokenizer without its added tokens: encodes text as text, so a special-token string inside
        # a message (say `<｜Assistant｜>`) never becomes the control token (see _encode_pieces).
        data = json.loads(tokenizer.to_str())
        data["added_tokens"] = []
        self._plain = tokenizers.Tokenizer.from_str(json.dumps(data))

    def _config_token_id(self, key: str) -> int | None:
        tok = self.config.get(key)
        if isinstance(tok, dict):  # transformers may write an AddedToken as {"content": ...}
            tok = tok.get("content")
        return self.tokenizer.token_to_id(tok) if isinstance(tok, str) else None

    def _need_chat(self, what: str = "the chat template") -> None:
        if not self.has_chat_template:
            missing = [t for t in SPECIAL_TOKENS if self.tokenizer.token_to_id(t) is None]
            raise ValueError(f"{what} needs DeepSeek's special tokens, which this tokenizer lacks "
                             f"({', '.join(missing)}); use raw prompts instead (prompt_format='raw', "
                             "CLI --no-chat-template)")

    def _chat_id(self, token: str) -> int:
        self._need_chat(f"the token {token}")
        return self._ids[token]

    @property
    def bos_id(self) -> int | None:
        """DeepSeek's BOS, else the config's bos_token; None when the tokenizer has none (Qwen2)."""
        return self._ids[BOS]

    @property
    def eos_id(self) -> int | None:
        """DeepSeek's EOS, else the config's eos_token; None when unknown (the model config's eos is used)."""
        return self._ids[EOS]

    @property
    def pad_id(self) -> int:
        return self._ids[PAD]

    @property
    def user_id(self) -> int:
        return self._chat_id(USER)

    @property
    def assistant_id(self) -> int:
        return self._chat_id(ASSISTANT)

    @property
    def think_id(self) -> int:
        return self._chat_id(THINK)

    @property
    def end_think_id(self) -> int:
        return self._chat_id(END_THINK)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = False) -> list[int]:
        """Token ids of text; special-token strings in it become their tokens (see encode_text for user text)."""
        ids = self._encode(self.tokenizer, text)
        return [self._bos_or_error()] + ids if add_bos else ids

    def _bos_or_error(self) -> int:
        if self.bos_id is None:
            raise ValueError("this tokenizer has no BOS token (no DeepSeek BOS, no bos_token in tokenizer_config.json)")
        return self.bos_id

    def encode_prompt(self, text: str) -> list[int]:
        """A raw prompt (no chat template): the text encoded as-is, with the tokenizer's own special-token handling
        (its post-processor, as transformers' `tokenizer(text)` applies it), and a BOS in front only when the
        tokenizer's config says add_bos_token and the post-processor did not already put one there."""
        ids = self.tokenizer.encode(text, add_special_tokens=True).ids
        if self.add_bos_token and self.bos_id is not None and (not ids or ids[0] != self.bos_id):
            ids = [self.bos_id] + ids
        return ids

    def encode_text(self, text: str) -> list[int]:
        """Token ids of text taken literally: a special-token string in it is encoded as ordinary text, never as
        the control token. What the chat template uses for every message's content."""
        return self._encode(self._plain, text)

    @staticmethod
    def _encode(tok: tokenizers.Tokenizer, text: str) -> list[int]:
        if len(text) < 4096:
            return tok.encode(text, add_special_tokens=False).ids
        # encode_batch runs without the GIL (encode holds it): a long text does not stall other threads
        return tok.encode_batch([text], add_special_tokens=False)[0].ids

    def _encode_pieces(self, pieces) -> list[list[int]]:
        """Per (text, kind, is_text) piece of _render_pieces, its ids: template markup with its special tokens,
        the caller's text literally (a user cannot forge a turn by typing the template's tokens)."""
        return [self.encode_text(text) if is_text else self.encode(text) for text, _, is_text in pieces]

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False) -> list[list[int]]:
        """encode() over many texts, run in parallel by the Rust side."""
        out = [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]
        return [[self._bos_or_error()] + ids for ids in out] if add_bos else out

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)  # tensors and arrays too
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages, thinking: bool = False, add_generation_prompt: bool = True,
                            keep_last_reasoning: bool = True) -> list[int]:
        """Token ids of render_chat(...); the same ids transformers gets from the saved Jinja template for content
        without special-token strings. Message content is encoded literally (encode_text): a special-token string
        typed into a message stays text, so a user or tool cannot forge a turn (transformers would parse it)."""
        self._need_chat()
        pieces = _render_pieces(messages, thinking, add_generation_prompt, keep_last_reasoning)
        return [t for ids in self._encode_pieces(pieces) for t in ids]

    def encode_chat_with_mask(self, messages, thinking: bool = False,
                              all_assistant_turns: bool = False) -> tuple[list[int], list[int]]:
        """(ids, mask) of a training conversation that ends with an assistant turn, for SFT.

        mask[i] = 1 on the tokens the model should learn to generate: the final assistant turn's
        completion after its generation prompt (reasoning + `</think>` when thinking, then content and
        EOS), and with all_assistant_turns also every earlier assistant turn's content + EOS. The
        assistant tag and the think tag that opens a turn belong to the prompt (mask 0).
        ids == apply_chat_template(messages, thinking, add_generation_prompt=False).
        """
        validate_messages(messages)
        self._need_chat()
        if messages[-1]["role"] != "assistant":
            raise ValueError(f"encode_chat_with_mask: the last message must be an assistant turn, "
                             f"got role {messages[-1]['role']!r}")
        ids, mask = [], []
        pieces = _render_pieces(messages, thinking, False, True)
        for (_, kind, _), piece in zip(pieces, self._encode_pieces(pieces)):
            ids += piece
            mask += [int(kind == _FINAL or (all_assistant_turns and kind == _HISTORY))] * len(piece)
        return ids, mask

    def save(self, directory: str, model_max_length: int | None = None) -> None:
        """Write tokenizer.json and tokenizer_config.json (a transformers-loadable folder), atomically."""
        os.makedirs(directory, exist_ok=True)
        if not self.has_chat_template:  # a foreign tokenizer: its own config back, never DeepSeek's tokens
            config = {**self.config, "model_max_length": model_max_length or self.model_max_length}
            _atomic_write_text(os.path.join(directory, TOKENIZER_FILE), self.tokenizer.to_str(pretty=True))
            _atomic_write_text(os.path.join(directory, CONFIG_FILE), json.dumps(config, indent=2, ensure_ascii=False))
            return
        config = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": BOS,
            "eos_token": EOS,
            "pad_token": PAD,
            "add_bos_token": False,  # the chat template writes BOS itself; never a second one
            "add_eos_token": False,
            "clean_up_tokenization_spaces": False,  # byte-level decoding is already exact
            "model_max_length": model_max_length or self.model_max_length,
            "chat_template": CHAT_TEMPLATE,
        }
        _atomic_write_text(os.path.join(directory, TOKENIZER_FILE), self.tokenizer.to_str(pretty=True))
        _atomic_write_text(os.path.join(directory, CONFIG_FILE), json.dumps(config, indent=2, ensure_ascii=False))

    @classmethod
    def load(cls, directory: str) -> Tokenizer:
        """Load a folder written by save() (or any folder whose tokenizer.json has DeepSeek's tokens)."""
        path = os.path.join(directory, TOKENIZER_FILE)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"tokenizer file not found: {path} (write one with Tokenizer.save)")
        from .checkpoint import CheckpointError  # a damaged file is refused like a damaged checkpoint

        model_max_length, cfg = 131072, {}
        config_path = os.path.join(directory, CONFIG_FILE)
        if os.path.isfile(config_path):  # optional: only model_max_length is read back
            try:
                with open(config_path, encoding="utf-8") as f:
                    cfg = json.load(f)
                model_max_length = int(cfg.get("model_max_length", model_max_length))
            except (ValueError, TypeError, AttributeError) as e:  # bad JSON / UTF-8, not an object, not a number
                raise CheckpointError(f"{config_path}: field 'model_max_length' cannot be read ({e})") from None
        try:
            tok = tokenizers.Tokenizer.from_file(path)
        except Exception as e:  # the tokenizers library raises plain Exception
            raise CheckpointError(f"{path}: not a valid tokenizer file ({e})") from None
        try:
            return cls(tok, model_max_length, cfg)
        except ValueError as e:
            raise CheckpointError(f"{path}: {e}") from None


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2,
                    digit_group: int = 3) -> Tokenizer:
    """Train a byte-level BPE tokenizer of at most vocab_size tokens (fewer if the corpus runs out of
    pairs seen min_frequency times). The vocabulary holds the 7 special tokens (ids 0..6) and all 256
    bytes, so vocab_size must be at least 263.

    digit_group: numbers are split into runs of at most this many digits before BPE (DeepSeek-V3: 3).
    1 gives one token per digit, which makes column arithmetic far easier for very small models."""
    if digit_group not in (1, 2, 3):
        raise ValueError(f"digit_group must be 1, 2 or 3, got {digit_group}")
    min_size = len(SPECIAL_TOKENS) + 256
    if vocab_size < min_size:
        raise ValueError(f"vocab_size must be >= {min_size} (7 special tokens + 256 bytes), got {vocab_size}")
    if min_frequency < 1:
        raise ValueError(f"min_frequency must be >= 1, got {min_frequency}")
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(_DIGITS.replace("{1,3}", "{1,%d}" % digit_group)), behavior="isolated"),
        pre_tokenizers.Split(Regex(_CJK), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS],  # ids 0..6
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    # The trainer registers all its special tokens as special; mark the think tags non-special.
    data = json.loads(tok.to_str())
    for added in data["added_tokens"]:
        if added["content"] in NON_SPECIAL_ADDED:
            added["special"] = False
    return Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(data)))
