"""Byte-level BPE tokenizer with DeepSeek's special tokens and the V3.1 hybrid-thinking chat template, with tools.

- Training: HF `tokenizers` BPE over bytes (every string, English or Chinese, encodes without unknowns),
  pre-tokenized like DeepSeek-V3: digits in groups of at most 3, CJK runs apart from Latin letters,
  then GPT-2's byte-level regex. Deterministic for the same input.
- Special tokens, with DeepSeek's spelling (bars U+FF5C, underscores U+2581) and its bos 0 / eos 1:
  0 BOS, 1 EOS, 2 PAD, 3 `<｜User｜>`, 4 `<｜Assistant｜>`, 5 `<think>`, 6 `</think>`, then DeepSeek-V3.1's
  tool tokens 7-13 (TOOL_TOKENS). As in DeepSeek-V3.1's tokenizer, `<think>` / `</think>` and the tool tokens
  are added tokens that are *not* special: they are never split, but `decode(..., skip_special_tokens=True)`
  keeps them, so the reasoning and the tool calls of a decoded completion can still be found.
- Chat (V3.1 hybrid thinking): BOS, the system prompt(s) joined by a blank line, then
  `<｜User｜>{content}` per user turn and `<｜Assistant｜></think>{content}<｜end▁of▁sentence｜>` per assistant
  turn; reasoning of earlier turns is dropped. The generation prompt is `<｜Assistant｜><think>` (thinking)
  or `<｜Assistant｜></think>` (non-thinking). A final assistant turn rendered with thinking=True keeps its
  reasoning: `<｜Assistant｜><think>{reasoning}</think>{content}<｜end▁of▁sentence｜>`, so the generation
  prompt is always a prefix of the rendered training sample.
- Tools (DeepSeek-V3.1's format, its tokenizer_config.json chat_template and model card): `tools=` adds the
  model card's `## Tools` section to the system prompt (as one more system message would); an assistant turn
  with `tool_calls` ends `{content}<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>{name}<｜tool▁sep｜>{arguments}
  <｜tool▁call▁end｜>...<｜tool▁calls▁end｜><｜end▁of▁sentence｜>`; a `tool` message is
  `<｜tool▁output▁begin｜>{content}<｜tool▁output▁end｜>`, and the assistant turn after tool outputs has no
  `<｜Assistant｜>` tag (the model goes on where the outputs end; the non-thinking generation prompt there is
  empty). Thinking with tools follows DeepSeek-V3.2's rule (its encoding_dsv32.py): the assistant turns after
  the last user message keep their reasoning across tool calls (`<think>{reasoning}</think>` after the tag, or
  after the tool outputs, where the thinking generation prompt is `<think>`); at the next user message they are
  history, and their reasoning is dropped. V3.1's template has no thinking with tool calls (it always writes
  `</think>` before them): without thinking nanoseek renders exactly what V3.1's template does (tested).
- One source: the Jinja CHAT_TEMPLATE is the chat format. nanoseek renders it with jinja2 (render_chat,
  apply_chat_template, encode_chat_with_mask), and `save` writes it into a Hugging Face tokenizer folder, where
  transformers / vLLM render the same text and ids (tested), tools included. It takes `thinking` or HF / vLLM's
  `enable_thinking`, marks each assistant completion with `{% generation %}` (transformers'
  return_assistant_tokens_mask, TRL's assistant-only loss; nanoseek's SFT mask), and adds no generation prompt
  after a final assistant turn (as V3.1).
- A tokenizer trained before the tool tokens existed (ids 0..6 only) still loads and chats as before; rendering
  tools, tool calls or tool messages with it raises ValueError naming the missing tokens (`has_tool_tokens`):
  its model has no embedding rows for them, so they cannot be added after the fact.

Simplifications against DeepSeek-V3.1's template: no `prefix` continuation; an assistant tag for every assistant
turn except after tool outputs (DeepSeek also omits it for consecutive assistant turns); reasoning left inside an
assistant's content is cut at `</think>` on every assistant turn (DeepSeek: not after tool outputs).
"""

from __future__ import annotations

import json
import os
import re
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
# DeepSeek-V3.1's tool-call tokens (V3's vocabulary, ids 128806-128814, less the unused tool_outputs pair)
TOOL_CALLS_BEGIN = "<｜tool▁calls▁begin｜>"
TOOL_CALLS_END = "<｜tool▁calls▁end｜>"
TOOL_CALL_BEGIN = "<｜tool▁call▁begin｜>"
TOOL_CALL_END = "<｜tool▁call▁end｜>"
TOOL_SEP = "<｜tool▁sep｜>"
TOOL_OUTPUT_BEGIN = "<｜tool▁output▁begin｜>"
TOOL_OUTPUT_END = "<｜tool▁output▁end｜>"
TOOL_TOKENS = (TOOL_CALLS_BEGIN, TOOL_CALLS_END, TOOL_CALL_BEGIN, TOOL_CALL_END, TOOL_SEP, TOOL_OUTPUT_BEGIN,
               TOOL_OUTPUT_END)  # ids 7..13 in a tokenizer trained since they were added
NON_SPECIAL_ADDED = (THINK, END_THINK) + TOOL_TOKENS  # kept by decode(skip_special_tokens=True), as in DeepSeek-V3.1
ROLES = ("system", "user", "assistant", "tool")

# The tool section of the system prompt, from DeepSeek-V3.1's model card ("ToolCall"): one `### name` block per
# tool, then the format the model must follow. The Jinja template below writes the same text.
TOOLS_HEADER = "## Tools\nYou have access to the following tools:\n\n"
TOOLS_FORMAT = ("IMPORTANT: ALWAYS adhere to this exact format for tool use:\n" + TOOL_CALLS_BEGIN + TOOL_CALL_BEGIN
                + "tool_call_name" + TOOL_SEP + "tool_call_arguments" + TOOL_CALL_END + "{additional_tool_calls}"
                + TOOL_CALLS_END + "\n\nWhere:\n- `tool_call_name` must be an exact match to one of the available "
                "tools\n- `tool_call_arguments` must be valid JSON that strictly follows the tool's Parameters Schema"
                "\n- For multiple tool calls, chain them directly without separators or spaces")

TOKENIZER_FILE = "tokenizer.json"
CONFIG_FILE = "tokenizer_config.json"

# DeepSeek-V3's pre-tokenizer splits digits into groups of <= 3 and CJK runs from neighbouring letters.
_DIGITS = r"\p{N}{1,3}"
_CJK = "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"

# The chat template: this Jinja text is the one source of the chat format. nanoseek renders it with jinja2 the way
# transformers does (render_chat / apply_chat_template below), and `save` writes it into tokenizer_config.json for
# transformers / vLLM / SGLang, so the two renderings cannot drift. transformers renders it with trim_blocks /
# lstrip_blocks; it is written on one logical line per statement with `{%-` so no stray whitespace reaches the
# output. Its `tojson` is transformers' (json.dumps with ensure_ascii=False, keys in order).
# Variables: messages, tools, add_generation_prompt, thinking (nanoseek, DeepSeek-V3.1) or enable_thinking (what
# transformers / vLLM callers pass; `thinking` wins when both are given), keep_last_reasoning (nanoseek).
# `{% generation %}` marks each assistant turn's completion: transformers' return_assistant_tokens_mask (TRL's
# assistant-only loss) and nanoseek's encode_chat_with_mask read their loss masks from it.
def _q(text: str) -> str:
    """text as a single-quoted Jinja string literal."""
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'").replace("\n", "\\n") + "'"


CHAT_TEMPLATE = (
    "{%- if thinking is not defined %}"
    "{%- set thinking = enable_thinking if enable_thinking is defined and enable_thinking is not none else false %}"
    "{%- endif %}"
    "{%- if keep_last_reasoning is not defined %}{%- set keep_last_reasoning = true %}{%- endif %}"
    "{%- set ns = namespace(system='', first=true, last_user=-1, prev='', tools='') %}"
    "{%- for m in messages %}{%- if m['role'] == 'system' %}"
    "{%- if ns.first %}{%- set ns.system = m['content'] %}{%- set ns.first = false %}"
    "{%- else %}{%- set ns.system = ns.system + '\\n\\n' + m['content'] %}{%- endif %}"
    "{%- elif m['role'] == 'user' %}{%- set ns.last_user = loop.index0 %}"
    "{%- endif %}{%- endfor %}"
    # tools: the model card's section, appended to the system prompt as one more system message would be
    "{%- if tools is defined and tools %}"
    "{%- set ns.tools = " + _q(TOOLS_HEADER) + " %}"
    "{%- for t in tools %}{%- set f = t['function'] %}"
    "{%- set ns.tools = ns.tools + '### ' + f['name'] + '\\nDescription: '"
    " + (f['description'] if f['description'] is defined and f['description'] is not none else '')"
    " + '\\n\\nParameters: '"
    " + ((f['parameters'] | tojson) if f['parameters'] is defined and f['parameters'] is not none else '{}')"
    " + '\\n\\n' %}"
    "{%- endfor %}"
    "{%- set ns.tools = ns.tools + " + _q(TOOLS_FORMAT) + " %}"
    "{%- if ns.first %}{%- set ns.system = ns.tools %}{%- else %}{%- set ns.system = ns.system + '\\n\\n' + ns.tools %}"
    "{%- endif %}{%- endif %}"
    "{{- '" + BOS + "' + ns.system }}"
    "{%- for m in messages %}"
    "{%- if m['role'] == 'user' %}{{- '" + USER + "' + m['content'] }}"
    "{%- elif m['role'] == 'assistant' %}"
    "{%- set content = m['content'] if m['content'] is defined and m['content'] is not none else '' %}"
    "{%- if '" + END_THINK + "' in content %}{%- set content = content.split('" + END_THINK + "', 1)[1] %}{%- endif %}"
    # V3.2: the turns after the last user message keep their reasoning (a trailing one only if keep_last_reasoning)
    "{%- set keep = thinking and loop.index0 > ns.last_user and (keep_last_reasoning or not loop.last) %}"
    "{%- if keep %}{%- if ns.prev != 'tool' %}{{- '" + ASSISTANT + "' }}{%- endif %}{{- '" + THINK + "' }}"
    "{%- elif ns.prev != 'tool' %}{{- '" + ASSISTANT + END_THINK + "' }}{%- endif %}"
    # what the model generates: reasoning (when kept), content, tool calls, EOS; the tags above are prompt
    "{%- generation %}"
    "{%- if keep %}{{- (m['reasoning_content'] if m['reasoning_content'] is defined"
    " and m['reasoning_content'] is not none else '') + '" + END_THINK + "' }}{%- endif %}"
    "{{- content }}"
    "{%- if m['tool_calls'] is defined and m['tool_calls'] %}{{- '" + TOOL_CALLS_BEGIN + "' }}"
    "{%- for c in m['tool_calls'] %}{%- set args = c['function']['arguments'] %}"
    "{{- '" + TOOL_CALL_BEGIN + "' + c['function']['name'] + '" + TOOL_SEP + "'"
    " + (args if args is string else args | tojson) + '" + TOOL_CALL_END + "' }}"
    "{%- endfor %}{{- '" + TOOL_CALLS_END + "' }}{%- endif %}"
    "{{- '" + EOS + "' }}"
    "{%- endgeneration %}"
    "{%- elif m['role'] == 'tool' %}{{- '" + TOOL_OUTPUT_BEGIN + "' + m['content'] + '" + TOOL_OUTPUT_END + "' }}"
    "{%- elif m['role'] != 'system' %}{{- raise_exception('unknown chat role: ' + m['role']) }}"
    "{%- endif %}"
    "{%- if m['role'] != 'system' %}{%- set ns.prev = m['role'] %}{%- endif %}"
    "{%- endfor %}"
    # as DeepSeek-V3.1: a chat that ends with an assistant turn is complete, it gets no generation prompt
    "{%- if add_generation_prompt and ns.prev != 'assistant' %}"
    "{%- if ns.prev == 'tool' %}{{- '" + THINK + "' if thinking else '' }}"
    "{%- else %}{{- '" + ASSISTANT + "' + ('" + THINK + "' if thinking else '" + END_THINK + "') }}{%- endif %}"
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


def _tool_call_error(where: str, c) -> str | None:
    """Why c is not an OpenAI tool call ({"function": {"name": str, "arguments": str or object}}), else None."""
    f = c.get("function") if isinstance(c, dict) else None
    if not isinstance(f, dict):
        return f"{where} must be an object with a `function` object, got {type(c).__name__}"
    if not isinstance(f.get("name"), str) or not f["name"]:
        return f"{where}.function.name must be a non-empty string, got {f.get('name')!r:.100}"
    if not isinstance(f.get("arguments"), (str, dict)):
        return f"{where}.function.arguments must be a JSON string (or an object), got {type(f.get('arguments')).__name__}"
    return None


def validate_messages(messages, where: str = "messages") -> None:
    """Raise ValueError naming `where` and the message index if messages is not a valid chat."""
    if not isinstance(messages, (list, tuple)) or len(messages) == 0:
        raise ValueError(f"{where}: must be a non-empty list of messages, got {type(messages).__name__}")
    prev = None  # the role of the previous non-system message
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise ValueError(f"{where}[{i}]: each message must be a dict, got {type(m).__name__}")
        role = m.get("role")
        if role not in ROLES:
            raise ValueError(f"{where}[{i}].role must be one of {'/'.join(ROLES)}, got {role!r}")
        calls = m.get("tool_calls")
        if calls is not None:
            if role != "assistant" or not isinstance(calls, (list, tuple)):
                raise ValueError(f"{where}[{i}].tool_calls must be a list on an assistant turn, got "
                                 f"{type(calls).__name__} on a {role} turn")
            for j, c in enumerate(calls):
                err = _tool_call_error(f"{where}[{i}].tool_calls[{j}]", c)
                if err:
                    raise ValueError(err)
        content = m.get("content")
        if not isinstance(content, str) and not (content is None and calls):
            raise ValueError(f"{where}[{i}].content must be a string, got {type(content).__name__}")
        reasoning = m.get("reasoning_content")
        if reasoning is not None and (role != "assistant" or not isinstance(reasoning, str)):
            raise ValueError(f"{where}[{i}].reasoning_content must be a string on an assistant turn, got "
                             f"{type(reasoning).__name__} on a {role} turn")
        if role == "tool" and not (prev == "tool" or (prev == "assistant" and messages[i - 1].get("tool_calls"))):
            raise ValueError(f"{where}[{i}]: a tool message must follow an assistant message with tool_calls "
                             f"(or another tool message), got it after a {prev or 'system'} message")
        if role != "system":
            prev = role


def validate_tools(tools, where: str = "tools") -> None:
    """Raise ValueError naming the entry unless tools is None or a list of OpenAI function tools
    ({"type": "function", "function": {"name", "description"?, "parameters"?}})."""
    if tools is None:
        return
    if not isinstance(tools, (list, tuple)):
        raise ValueError(f"{where} must be a list of tools, got {type(tools).__name__}")
    for i, t in enumerate(tools):
        f = t.get("function") if isinstance(t, dict) else None
        if not isinstance(f, dict) or t.get("type", "function") != "function":
            raise ValueError(f"{where}[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}, got {t!r:.200}")
        if not isinstance(f.get("name"), str) or not f["name"]:
            raise ValueError(f"{where}[{i}].function.name must be a non-empty string, got {f.get('name')!r:.100}")
        if f.get("description") is not None and not isinstance(f["description"], str):
            raise ValueError(f"{where}[{i}].function.description must be a string, got {f['description']!r:.100}")
        if f.get("parameters") is not None and not isinstance(f["parameters"], dict):
            raise ValueError(f"{where}[{i}].function.parameters must be a JSON Schema object, got "
                             f"{f['parameters']!r:.100}")


def uses_tools(messages, tools=None) -> bool:
    """Whether rendering needs the tool tokens: tools given, or a tool call or tool message in the chat."""
    return bool(tools) or any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)


# Rendering CHAT_TEMPLATE. The caller's strings (message content, reasoning, tool names, arguments and schemas) go in
# escaped: each special-token string and each of the three private-use characters below becomes _ESC + a letter.
# So every special token in the rendered text is the template's own markup, the caller's text is encoded literally
# (a user cannot forge a turn by typing `<｜Assistant｜>`), and `{% generation %}` blocks come out between _GEN_OPEN
# and _GEN_CLOSE. The first `</think>` of an assistant's content stays raw: the template cuts reasoning left there.
_ESC, _GEN_OPEN, _GEN_CLOSE = "\ue000", "\ue001", "\ue002"
_RESERVED = (_ESC, _GEN_OPEN, _GEN_CLOSE) + SPECIAL_TOKENS + TOOL_TOKENS
_RESERVED_RE = re.compile("|".join(map(re.escape, _RESERVED)))
_UNESCAPE_RE = re.compile(_ESC + "(.)")
_MARKUP_RE = re.compile("(" + "|".join(map(re.escape, (_GEN_OPEN, _GEN_CLOSE) + SPECIAL_TOKENS + TOOL_TOKENS)) + ")")


def _escape(v):
    """v with every string in it (dict keys too) escaped, so no special-token string survives."""
    if isinstance(v, str):
        return _RESERVED_RE.sub(lambda m: _ESC + chr(ord("a") + _RESERVED.index(m.group(0))), v)
    if isinstance(v, dict):
        return {_escape(k): _escape(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_escape(x) for x in v]
    return v


def _unescape(text: str) -> str:
    return _UNESCAPE_RE.sub(lambda m: _RESERVED[ord(m.group(1)) - ord("a")], text)


def _escape_message(m: dict) -> dict:
    out = _escape(m)
    content = m.get("content")
    if m.get("role") == "assistant" and isinstance(content, str) and END_THINK in content:
        head, tail = content.split(END_THINK, 1)  # the template's cut point stays a real `</think>`
        out["content"] = _escape(head) + END_THINK + _escape(tail)
    return out


_TEMPLATE = None


def _template():
    """CHAT_TEMPLATE compiled once, in an environment set up like transformers' (sandboxed, trim/lstrip blocks,
    its tojson and raise_exception), whose `{% generation %}` writes _GEN_OPEN body _GEN_CLOSE."""
    global _TEMPLATE
    if _TEMPLATE is None:
        import jinja2
        from jinja2.ext import Extension
        from jinja2.sandbox import ImmutableSandboxedEnvironment

        class Generation(Extension):
            tags = {"generation"}

            def parse(self, parser):
                lineno = next(parser.stream).lineno
                body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
                return jinja2.nodes.CallBlock(self.call_method("_mark"), [], [], body).set_lineno(lineno)

            def _mark(self, caller):
                return _GEN_OPEN + caller() + _GEN_CLOSE

        def raise_exception(message):
            raise jinja2.exceptions.TemplateError(message)

        env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True,
                                            extensions=[Generation, "jinja2.ext.loopcontrols"])
        env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: \
            json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
        env.globals["raise_exception"] = raise_exception
        _TEMPLATE = env.from_string(CHAT_TEMPLATE)
    return _TEMPLATE


# Piece kinds of a rendered chat: what a loss mask would do with each piece.
_PROMPT, _FINAL, _HISTORY = 0, 1, 2


def _render_pieces(messages, thinking: bool, add_generation_prompt: bool, keep_last_reasoning: bool, tools=None,
                   validate: bool = True):
    """CHAT_TEMPLATE rendered, as (text, kind, is_special) pieces: is_special marks the template's special tokens,
    the rest is text to encode literally (unescaped). Every `{% generation %}` block is one assistant message's
    completion: _FINAL for the assistant turns after the last user message (the current turn, tool calls
    included), _HISTORY for earlier ones; everything else is _PROMPT."""
    if validate:
        validate_messages(messages)
        validate_tools(tools)
    text = _template().render(messages=[_escape_message(m) for m in messages], tools=_escape(tools) if tools else None,
                              thinking=bool(thinking), add_generation_prompt=add_generation_prompt,
                              keep_last_reasoning=keep_last_reasoning)
    last_user = max((i for i, m in enumerate(messages) if m["role"] == "user"), default=-1)
    turns = iter([_FINAL if i > last_user else _HISTORY for i, m in enumerate(messages) if m["role"] == "assistant"])
    pieces, kind = [], _PROMPT
    for k, part in enumerate(_MARKUP_RE.split(text)):
        if part == _GEN_OPEN:
            kind = next(turns)
        elif part == _GEN_CLOSE:
            kind = _PROMPT
        elif part:
            pieces.append((part if k % 2 else _unescape(part), kind, bool(k % 2)))
    return pieces


def tools_section(tools) -> str:
    """The `## Tools` section DeepSeek-V3.1's model card puts in the system prompt (CHAT_TEMPLATE's)."""
    validate_tools(tools)
    return "".join(p[0] for p in _render_pieces([], False, False, True, tools, validate=False))[len(BOS):]


def render_chat(messages, thinking: bool = False, add_generation_prompt: bool = True,
                keep_last_reasoning: bool = True, tools=None) -> str:
    """The V3.1 hybrid-thinking prompt string for a list of {role, content, [reasoning_content], [tool_calls]}
    dicts (roles system / user / assistant / tool) and optional OpenAI `tools`: CHAT_TEMPLATE rendered.

    keep_last_reasoning: with thinking=True, a final assistant turn keeps its reasoning_content inside
    `<think>...</think>` (a training sample); with False it is rendered like a history turn. Assistant turns after
    the last user message that are not the final message (a tool-calling loop) always keep theirs (V3.2).
    A chat that ends with an assistant turn gets no generation prompt (as DeepSeek-V3.1's template).
    """
    return "".join(p[0] for p in _render_pieces(messages, thinking, add_generation_prompt, keep_last_reasoning,
                                                tools))


def parse_completion(text: str, thinking: bool = True, strip_answer: bool = True) -> tuple[str, str]:
    """Split a generated completion into (reasoning, answer) at the first `</think>`.

    The reasoning is what precedes `</think>`, without a leading `<think>`; the answer is what follows,
    without a trailing EOS. Both are stripped of surrounding whitespace (the answer only if strip_answer; the
    server keeps it, as vLLM does). With no `</think>` the whole text is reasoning when the prompt opened thinking
    (the model never closed it: a truncated or malformed completion), else it is the answer.
    """
    text = text.strip() if strip_answer else text
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
    return reasoning.strip(), answer.strip() if strip_answer else answer


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
        self._tool_ids = {t: tokenizer.token_to_id(t) for t in TOOL_TOKENS}
        # a tokenizer trained before the tool tokens existed lacks them: plain chats only (see _need_tools)
        self.has_tool_tokens = self.has_chat_template and all(v is not None for v in self._tool_ids.values())
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

    def _need_tools(self, what: str = "tool calls") -> None:
        self._need_chat(what)
        if not self.has_tool_tokens:
            missing = [t for t in TOOL_TOKENS if self._tool_ids[t] is None]
            raise ValueError(f"{what} need DeepSeek-V3.1's tool tokens, which this tokenizer lacks "
                             f"({', '.join(missing)}): it was trained before nanoseek added them; retrain the "
                             "tokenizer (and the model) to use tools")

    def tool_token_id(self, token: str) -> int:
        """The id of one of TOOL_TOKENS (ValueError if this tokenizer lacks them)."""
        self._need_tools(f"the token {token}")
        return self._tool_ids[token]

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
        """Per (text, kind, is_special) piece of _render_pieces, its ids: the template's special tokens as such,
        all text literally (a user cannot forge a turn by typing the template's tokens)."""
        return [self.encode(text) if special else self.encode_text(text) for text, _, special in pieces]

    def encode_batch(self, texts: Sequence[str], add_bos: bool = False) -> list[list[int]]:
        """encode() over many texts, run in parallel by the Rust side."""
        out = [e.ids for e in self.tokenizer.encode_batch(list(texts), add_special_tokens=False)]
        return [[self._bos_or_error()] + ids for ids in out] if add_bos else out

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = ids.tolist() if hasattr(ids, "tolist") else list(ids)  # tensors and arrays too
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages, thinking: bool | None = None, add_generation_prompt: bool = True,
                            keep_last_reasoning: bool = True, tools=None, enable_thinking: bool | None = None
                            ) -> list[int]:
        """Token ids of render_chat(...); the same ids transformers gets from the saved Jinja template for content
        without special-token strings. thinking: DeepSeek's name; enable_thinking (HF / vLLM's) is the same switch. Message content is encoded literally (encode_text): a special-token string
        typed into a message stays text, so a user or tool cannot forge a turn (transformers would parse it).
        Tools, tool calls and tool messages need the tool tokens (ValueError without them)."""
        self._need_chat()
        thinking = bool(thinking if thinking is not None else enable_thinking)
        pieces = _render_pieces(messages, thinking, add_generation_prompt, keep_last_reasoning, tools)
        if uses_tools(messages, tools):
            self._need_tools()
        return [t for ids in self._encode_pieces(pieces) for t in ids]

    def encode_chat_with_mask(self, messages, thinking: bool = False, all_assistant_turns: bool = False,
                              tools=None) -> tuple[list[int], list[int]]:
        """(ids, mask) of a training conversation that ends with an assistant turn, for SFT.

        mask[i] = 1 on the tokens the model should learn to generate: the final assistant turn's
        completion after its generation prompt (reasoning + `</think>` when thinking, then content, tool calls
        and EOS; with tool calls, every assistant turn after the last user message), and with
        all_assistant_turns also every earlier assistant turn's content + EOS. The assistant tag, the think tag
        that opens a turn and tool outputs belong to the prompt (mask 0). The masked spans are CHAT_TEMPLATE's
        `{% generation %}` blocks, the ones transformers' return_assistant_tokens_mask reads.
        ids == apply_chat_template(messages, thinking, add_generation_prompt=False, tools=tools).
        """
        validate_messages(messages)
        self._need_chat()
        if messages[-1]["role"] != "assistant":
            raise ValueError(f"encode_chat_with_mask: the last message must be an assistant turn, "
                             f"got role {messages[-1]['role']!r}")
        ids, mask = [], []
        pieces = _render_pieces(messages, thinking, False, True, tools)
        if uses_tools(messages, tools):
            self._need_tools()
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
    pairs seen min_frequency times). The vocabulary holds the 7 chat tokens (ids 0..6), the 7 tool tokens
    (ids 7..13) and all 256 bytes, so vocab_size must be at least 270.

    digit_group: numbers are split into runs of at most this many digits before BPE (DeepSeek-V3: 3).
    1 gives one token per digit, which makes column arithmetic far easier for very small models."""
    if digit_group not in (1, 2, 3):
        raise ValueError(f"digit_group must be 1, 2 or 3, got {digit_group}")
    added = SPECIAL_TOKENS + TOOL_TOKENS
    min_size = len(added) + 256
    if vocab_size < min_size:
        raise ValueError(f"vocab_size must be >= {min_size} ({len(added)} special tokens + 256 bytes), got "
                         f"{vocab_size}")
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
        special_tokens=[AddedToken(t, special=True, normalized=False) for t in added],  # ids 0..13
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes: nothing is ever unknown
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    # The trainer registers all its special tokens as special; mark the think and tool tags non-special.
    data = json.loads(tok.to_str())
    for added in data["added_tokens"]:
        if added["content"] in NON_SPECIAL_ADDED:
            added["special"] = False
    return Tokenizer(tokenizers.Tokenizer.from_str(json.dumps(data)))
