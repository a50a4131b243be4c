"""Built-in tools a model can call (DeepSeek-V3.1's tool-call format, see tokenizer.py): a registry of
name -> (OpenAI JSON schema, function), shared by `nanoseek chat --tools` and, later, agentic RL rollouts.

- `calculator(expression)`: arithmetic by walking Python's AST (numbers, + - * / // % **, unary signs,
  parentheses); never `eval`. Exponents and results are bounded so `9**9**9` is an error, not a hang.
- `python(code)`: the code runs in a separate `python -I` process (isolated: no user site, no PYTHON* variables)
  in a fresh temporary folder with an empty environment, under resource limits set in the child before it
  starts: CPU seconds (RLIMIT_CPU) and a wall-clock timeout (the process is killed), address space
  (RLIMIT_AS, the memory limit), file size (RLIMIT_FSIZE 1 MiB) and no new processes (RLIMIT_NPROC 0). What it
  prints (stdout then stderr) is the result, cut to MAX_OUTPUT characters.
  No network is best effort: the child's `socket` module is replaced before the code runs, so `socket`,
  `urllib`, `http.client` and anything built on them fail. Code that goes around it (`import _socket`, ctypes)
  still reaches the network: real isolation needs a network namespace (`unshare -n`, a container), which this
  does not set up. RLIMIT_NPROC is not enforced for root. Linux (and macOS) only: `resource` is POSIX.

Tool functions take their JSON arguments as keyword arguments and return text; `call_tool` never raises for a bad
call (unknown tool, arguments that are not a JSON object, a wrong argument, a failing tool): it returns
"error: ..." text, which is what the model sees as the tool's output.
"""

from __future__ import annotations

import ast
import json
import math
import operator
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

MAX_OUTPUT = 4000  # characters of a tool's result kept
MAX_EXPRESSION = 1000  # characters of a calculator expression
MAX_EXPONENT = 10_000  # |b| in a ** b
MAX_DIGITS = 10_000  # an integer result longer than this is an error


@dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict  # JSON Schema of the arguments object
    fn: Callable[..., str]

    def schema(self) -> dict:
        """The OpenAI `tools` entry (what the chat template and the server take)."""
        return {"type": "function", "function": {"name": self.name, "description": self.description,
                                                 "parameters": self.parameters}}


# ---------------------------------------------------------------------------------------------- calculator
_BINARY = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow}
_UNARY = {ast.UAdd: operator.pos, ast.USub: operator.neg}


def _eval(node):
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and type(node.op) in _UNARY:
        return _UNARY[type(node.op)](_eval(node.operand))
    if isinstance(node, ast.BinOp) and type(node.op) in _BINARY:
        a, b = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Pow) and abs(b) > MAX_EXPONENT:
            raise ValueError(f"exponent {b} is too large (at most {MAX_EXPONENT})")
        out = _BINARY[type(node.op)](a, b)
        if isinstance(out, int) and out.bit_length() > MAX_DIGITS * 3.33:
            raise ValueError(f"the result has more than {MAX_DIGITS} digits")
        return out
    raise ValueError(f"unsupported expression element: {type(node).__name__}")


def calculator(expression: str) -> str:
    """The value of an arithmetic expression (ints stay exact; a float that is whole prints without .0)."""
    if not isinstance(expression, str) or not expression.strip():
        raise ValueError(f"expression must be a non-empty string, got {expression!r:.100}")
    if len(expression) > MAX_EXPRESSION:
        raise ValueError(f"expression is longer than {MAX_EXPRESSION} characters")
    value = _eval(ast.parse(expression.replace("^", "**"), mode="eval"))
    if isinstance(value, complex) or (isinstance(value, float) and not math.isfinite(value)):
        raise ValueError(f"the result is not a finite real number: {value}")
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e16:
        return str(int(value))
    return str(value)


# ---------------------------------------------------------------------------------------------- python
_PRELUDE = """
import socket
def _no_network(*a, **k):
    raise OSError("network access is disabled in this sandbox")
class _NoSocket(socket.socket):  # still a class, so modules that subclass socket (ssl) import
    __init__ = _no_network
socket.socket, socket.SocketType = _NoSocket, _NoSocket
socket.create_connection = socket.getaddrinfo = socket.gethostbyname = socket.fromfd = _no_network
del socket, _NoSocket, _no_network
"""


def _limits(timeout_s: float, memory_mb: int):
    def apply():  # runs in the child between fork and exec
        import resource

        cpu = max(1, math.ceil(timeout_s))
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
        resource.setrlimit(resource.RLIMIT_AS, (memory_mb << 20, memory_mb << 20))
        resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))
        resource.setrlimit(resource.RLIMIT_NPROC, (0, 0))
    return apply


def python(code: str, timeout_s: float = 5.0, memory_mb: int = 256) -> str:
    """Run code in a limited subprocess (see the module docstring); its stdout + stderr, and the exit status if it
    failed or timed out."""
    if not isinstance(code, str) or not code.strip():
        raise ValueError(f"code must be a non-empty string, got {code!r:.100}")
    with tempfile.TemporaryDirectory(prefix="nanoseek-python-") as tmp:
        try:
            r = subprocess.run([sys.executable, "-I", "-c", _PRELUDE + "\nexec(compile(" + repr(code)
                                + ", '<tool>', 'exec'), {'__name__': '__main__'})"],
                               cwd=tmp, env={"PATH": os.defpath}, capture_output=True, text=True,
                               timeout=timeout_s, preexec_fn=_limits(timeout_s, memory_mb), stdin=subprocess.DEVNULL)
        except subprocess.TimeoutExpired:
            return f"error: the code ran longer than {timeout_s:g} s and was stopped"
    out = (r.stdout + r.stderr)[-MAX_OUTPUT:]
    if r.returncode != 0:
        out += f"\n(exit status {r.returncode})"
    return out


def _python_tool(code: str) -> str:  # what the model may call: the limits are not its arguments
    return python(code)


# ---------------------------------------------------------------------------------------------- registry
TOOLS: dict[str, Tool] = {t.name: t for t in (
    Tool("calculator", "Evaluate an arithmetic expression exactly: numbers, + - * / // % ** and parentheses.",
         {"type": "object", "properties": {"expression": {"type": "string", "description": "for example 12*(3+4)"}},
          "required": ["expression"]}, calculator),
    Tool("python", "Run a Python 3 program (standard library only, no network, 5 s, 256 MiB) and return what it "
                   "prints.",
         {"type": "object", "properties": {"code": {"type": "string", "description": "the program; print the result"}},
          "required": ["code"]}, _python_tool),
)}


def tool_schemas(names=None, registry: dict[str, Tool] = TOOLS) -> list[dict]:
    """The OpenAI `tools` list for these tool names (default: all of the registry)."""
    names = list(registry) if names is None else names
    unknown = [n for n in names if n not in registry]
    if unknown:
        raise ValueError(f"unknown tool(s) {', '.join(unknown)}; the built-in tools are {', '.join(registry)}")
    return [registry[n].schema() for n in names]


def call_tool(name: str, arguments, registry: dict[str, Tool] = TOOLS) -> str:
    """Run one call: arguments is the model's JSON string (or a dict). Always returns text, "error: ..." on a bad
    call, cut to MAX_OUTPUT characters."""
    tool = registry.get(name)
    if tool is None:
        return f"error: unknown tool {name!r:.100}; available: {', '.join(registry)}"
    try:
        args = json.loads(arguments) if isinstance(arguments, str) else arguments
    except ValueError as e:
        return f"error: the arguments are not valid JSON ({e})"
    if not isinstance(args, dict):
        return f"error: the arguments must be a JSON object, got {type(args).__name__}"
    try:
        out = tool.fn(**args)
    except TypeError as e:  # a missing or unexpected argument
        return f"error: bad arguments for {name}: {e}"
    except Exception as e:  # the tool's own failure is its output
        return f"error: {type(e).__name__}: {e}"
    return str(out)[:MAX_OUTPUT]
