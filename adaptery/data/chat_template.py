"""Chat templates rendered under a budget of steps, time and size.

A chat template is a program, and an adapter imported from elsewhere brings its own: `{{ 'x' * 50000000 }}`
took a server from 3.4 to 10 GB on one chat, and the sandbox transformers renders in
(`ImmutableSandboxedEnvironment`) lets `range(100000)` loops nest (and `range(100000000)` raised
OverflowError: a 500). Every template, a base model's and an adapter's alike, renders here instead:

- **steps**: each loop iteration, call, filter, operator and output counts against `max_steps`, and
  the clock against `seconds` (Jinja has no other way to loop or recurse);
- **size**: no value is made longer than `max_chars` characters: operators, calls and filters are
  checked *before* they run where they can grow a value (repetition, padding, formatting widths,
  concatenation, joins), and every value after; a value's size counts shared parts every time they
  would print (`[x, x]` nested 60 times is 2^60 x's to `str()`), measured once per object;
- **output**: the text, and what macros and blocks build on the way to it, stays within `max_chars`.

The environment mirrors transformers' (`{% generation %}`, `tojson`, `raise_exception`, `strftime_now`,
loop controls, trim_blocks/lstrip_blocks) so a template renders here as it does there; the callers
tokenize the text themselves. Whatever goes wrong is a `ChatTemplateError` (a jinja2 TemplateError),
the message saying what, for the person who wrote the template.
"""

from __future__ import annotations

import functools
import json
import operator
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jinja2
from jinja2 import nodes
from jinja2.compiler import CodeGenerator, Frame
from jinja2.ext import Extension, loopcontrols
from jinja2.runtime import LoopContext, Undefined
from jinja2.sandbox import ImmutableSandboxedEnvironment
from jinja2.utils import Namespace

from adaptery.data.chat import content_text
from adaptery.data.untrusted import UntrustedJSONError, loads
from adaptery.settings import Settings

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

MAX_TEMPLATE_CHARS = 256 * 1024  # the longest templates on the Hub (tool-calling ones) are ~30k characters
OUTPUT_PASSES = 4  # what macros and blocks output on the way is counted again where it is used: a few levels
_CONFIG_FILES = ("chat_template.jinja", "tokenizer_config.json")


@dataclass(frozen=True)
class TemplateBudget:
    """What one rendering may take, and how deep the JSON a template is read from may nest."""

    max_chars: int
    max_steps: int
    seconds: float
    max_json_depth: int

    @classmethod
    def from_settings(cls, settings: Settings) -> TemplateBudget:
        return cls(
            max_chars=settings.chat_template_max_chars,
            max_steps=settings.chat_template_max_steps,
            seconds=settings.chat_template_seconds,
            max_json_depth=settings.max_json_depth,
        )

    @classmethod
    def default(cls) -> TemplateBudget:
        """The documented defaults, without reading the environment (a library's own default)."""
        return cls.from_settings(Settings.model_construct())


class ChatTemplateError(jinja2.TemplateError):
    """The template cannot render this conversation: its own error, or over its budget."""


class TemplateBudgetExceeded(ChatTemplateError):
    pass


# --- the meter: one per rendering, on the rendering thread -------------------------------------------

_active = threading.local()


def _meter() -> _Meter:
    meter = getattr(_active, "meter", None)
    if meter is None:  # compile time: Jinja folds constants by running filters; never fold ours
        raise nodes.Impossible()
    return meter


class _Meter:
    def __init__(self, budget: TemplateBudget, spans: list[tuple[int, int]] | None) -> None:
        self.budget = budget
        self.deadline = time.monotonic() + budget.seconds
        self.steps = 0
        self.output = 0  # characters output anywhere, macros and blocks included
        self.rendered = 0  # characters handed to the caller so far ({% generation %} spans start here)
        self.spans = spans
        self._sizes: dict[int, tuple[Any, int]] = {}  # id -> (the object, kept alive; its size)

    def step(self) -> None:
        self.steps += 1
        if self.steps > self.budget.max_steps:
            raise TemplateBudgetExceeded(
                f"the chat template took more than {self.budget.max_steps} steps (loop iterations, calls and "
                "operations)"
            )
        if not self.steps & 63 and time.monotonic() > self.deadline:
            raise TemplateBudgetExceeded(f"the chat template ran longer than {self.budget.seconds} s")

    def allow(self, size: int, what: str) -> None:
        if size > self.budget.max_chars:
            raise TemplateBudgetExceeded(
                f"the chat template would make {what} of more than {self.budget.max_chars} characters"
            )

    def check(self, *values: Any) -> None:
        for value in values:
            self.allow(self.size(value), "a value")

    def size(self, value: Any) -> int:
        """About the length of `str(value)` (of its JSON for containers), each shared part counted as often
        as it would print. Containers are measured once per rendering (the sandbox keeps lists and dicts
        unchanged), except those holding a namespace, which can change: they are measured afresh."""
        scalar = _scalar_size(value)
        if scalar is not None:
            return scalar
        if id(value) in self._sizes:
            return self._sizes[id(value)][1]
        walked: dict[int, tuple[int, bool]] = {}  # this walk's (size, holds a namespace) per container
        frames = [[value, iter(_children(value)), 2, isinstance(value, Namespace)]]  # depth first, no recursion
        on_path = {id(value)}
        while frames:
            frame = frames[-1]
            for child in frame[1]:
                known = self._known(child, walked)
                if known is None and id(child) in on_path:  # a namespace holding itself prints as "[...]"
                    known = (5, True)
                if known is None:
                    frames.append([child, iter(_children(child)), 2, isinstance(child, Namespace)])
                    on_path.add(id(child))
                    break
                frame[2] += known[0] + 2
                frame[3] = frame[3] or known[1]
            else:
                frames.pop()
                node, size, changeable = frame[0], frame[2], frame[3]
                on_path.discard(id(node))
                walked[id(node)] = (size, changeable)
                if not changeable:
                    self._sizes[id(node)] = (node, size)  # the object is kept, so its id is not reused
                if frames:
                    frames[-1][2] += size + 2
                    frames[-1][3] = frames[-1][3] or changeable
        return walked[id(value)][0]

    def _known(self, value: Any, walked: dict[int, tuple[int, bool]]) -> tuple[int, bool] | None:
        scalar = _scalar_size(value)
        if scalar is not None:
            return scalar, False
        if id(value) in self._sizes:
            return self._sizes[id(value)][1], False
        return walked.get(id(value))

    def items(self, iterable: Iterable[Any], what: str) -> Iterator[Any]:
        """`iterable`'s items, each a step, their sizes together within the budget."""
        total = 0
        for item in iterable:
            self.step()
            total += self.size(item)
            self.allow(total, what)
            yield item


def _scalar_size(value: Any) -> int | None:
    if isinstance(value, str | bytes):
        return len(value)
    if isinstance(value, bool) or value is None:
        return 5
    if isinstance(value, int):
        return value.bit_length() // 3 + 1
    if isinstance(value, float):
        return 24
    if isinstance(value, range):
        try:
            return len(value) * (len(str(max(abs(value.start), abs(value.stop)))) + 2)
        except OverflowError:
            return 2**63
    if isinstance(value, list | tuple | set | frozenset | dict | Namespace | Mapping) or _is_view(value):
        return None
    if isinstance(value, Undefined):
        return 0
    return len(type(value).__name__) + 2  # macros, loops, functions: print as a short repr


def _is_view(value: Any) -> bool:
    return type(value).__name__ in ("dict_keys", "dict_values", "dict_items")


def _children(value: Any) -> list[Any]:
    if isinstance(value, Namespace):
        value = object.__getattribute__(value, "_Namespace__attrs")
    if isinstance(value, Mapping):
        return [*value.keys(), *value.values()]
    return list(value)


# --- the environment -------------------------------------------------------------------------------


class _Generator(CodeGenerator):
    """Compiles what walks a value so that it is metered: each loop iteration a step; concatenations,
    comparisons and dict keys (hashed) sized first (comparing or hashing a value built of shared parts
    walks every copy: `[x, x]` nested 60 deep is 2^60 comparisons)."""

    def visit_For(self, node: nodes.For, frame: Frame) -> None:
        metered = nodes.EnvironmentAttribute("metered_loop", lineno=node.iter.lineno)
        if not (isinstance(node.iter, nodes.Call) and node.iter.node == metered):
            node.iter = nodes.Call(metered, [node.iter], [], None, None, lineno=node.iter.lineno)
        super().visit_For(node, frame)

    def visit_Concat(self, node: nodes.Concat, frame: Frame) -> None:
        self.write("environment.metered_concat((")
        for part in node.nodes:
            self.visit(part, frame)
            self.write(", ")
        self.write("))")

    def visit_Compare(self, node: nodes.Compare, frame: Frame) -> None:
        self.write("environment.metered_compare(")
        self.visit(node.expr, frame)
        for operand in node.ops:
            self.write(f", {operand.op!r}, ")
            self.visit(operand.expr, frame)
        self.write(")")

    def visit_Dict(self, node: nodes.Dict, frame: Frame) -> None:
        self.write("environment.metered_dict((")
        for item in node.items:
            self.write("(")
            self.visit(item.key, frame)
            self.write(", ")
            self.visit(item.value, frame)
            self.write("), ")
        self.write("))")


class _GenerationTracker(Extension):
    """transformers' `{% generation %}`: the spans of rendered text that are the assistant's turns."""

    tags = {"generation"}

    def parse(self, parser: jinja2.parser.Parser) -> nodes.CallBlock:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return nodes.CallBlock(self.call_method("_track"), [], [], body).set_lineno(lineno)

    def _track(self, caller: Callable[[], str]) -> str:
        text = caller()
        meter = _meter()
        if meter.spans is not None:
            meter.spans.append((meter.rendered, meter.rendered + len(text)))
        return text


class _TemplateNamespace(Namespace):
    """transformers' namespace: no underscore names (a way into CPython internals)."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # noqa: N805 - Jinja's own signature trick
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: object) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"a namespace cannot hold an underscore name ({name!r})")


class _TemplateDict:
    """transformers' `dict`: calling it and `fromkeys`, not the type (its attributes lead into CPython)."""

    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


def _raise_exception(message: str) -> None:
    raise ChatTemplateError(message)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _range(*args: int) -> range:
    meter = _meter()
    try:
        values = range(*args)
        length = len(values)
    except OverflowError:
        length = 2**63
    if length > meter.budget.max_steps:
        raise TemplateBudgetExceeded(
            f"the chat template asked for a range of {length} numbers; it may take {meter.budget.max_steps} steps"
        )
    return values


def _tojson(
    value: Any, ensure_ascii: bool = False, indent: int | str | None = None, separators: Any = None,
    sort_keys: bool = False,
) -> str:  # fmt: skip
    """transformers' tojson (no HTML escaping), encoded piece by piece within the budget."""
    meter = _meter()
    encoder = json.JSONEncoder(ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    pieces, total = [], 0
    for piece in encoder.iterencode(value):  # the pure-Python encoder: it yields as it goes
        total += len(piece)
        meter.allow(total, "a JSON text")
        pieces.append(piece)
    return "".join(pieces)


_PRINTF = re.compile(r"%(?:\([^)]*\))?[#0 +-]*(\*|\d+)?(?:\.(\*|\d+))?[a-zA-Z%]")
_DIGITS = re.compile(r"\d+")
# Attributes a template may reach on plain values; the rest of str (translate, encode) and of numbers
# (to_bytes) can grow a value past any check made before the call.
_STR_METHODS = frozenset(
    "capitalize casefold center count endswith expandtabs find format format_map index isalnum isalpha isascii "  # noqa: SIM905
    "isdecimal isdigit isidentifier islower isnumeric isprintable isspace istitle isupper join ljust lower lstrip "
    "partition removeprefix removesuffix replace rfind rindex rjust rpartition rsplit rstrip split splitlines "
    "startswith strip swapcase title upper zfill".split()
)
_CONTAINER_METHODS = frozenset(("copy", "count", "get", "index", "items", "keys", "values"))
_NUMBER_ATTRIBUTES = frozenset(("real", "imag", "numerator", "denominator", "bit_length", "is_integer", "conjugate"))
_DROPPED_FILTERS = ("pprint", "urlize", "xmlattr", "wordwrap")  # no chat template uses them; each amplifies


def _widest(*values: Any) -> int:
    return max((v for v in values if isinstance(v, int) and not isinstance(v, bool)), default=0)


def _printf_size(meter: _Meter, text: str, values: Any) -> int:
    conversions = _PRINTF.findall(text)
    args = values if isinstance(values, tuple) else (values,)
    widths = [int(w) for pair in conversions for w in pair if w.isdigit()]
    return len(text) + len(conversions) * (meter.size(values) + max([*widths, _widest(*args)], default=0))


def _str_method_size(meter: _Meter, text: str, name: str, args: tuple, kwargs: dict) -> int:
    """An upper bound of what `text.name(*args, **kwargs)` makes, for the methods that can grow a string."""
    if name in ("center", "ljust", "rjust", "zfill"):
        return len(text) + _widest(*args, *kwargs.values())
    if name == "expandtabs":
        return len(text) + text.count("\t") * _widest(*args, *kwargs.values(), 8)
    if name == "replace" and len(args) >= 2 and isinstance(args[0], str) and isinstance(args[1], str):
        old, new = args[0], args[1]
        return len(text) + (text.count(old) if old else len(text) + 1) * max(len(new) - len(old), 0)
    if name in ("format", "format_map"):
        fields = text.count("{")
        widest = max([int(d) for d in _DIGITS.findall(text)] + [_widest(*args, *kwargs.values())])
        return len(text) + fields * (meter.size(args) + meter.size(kwargs) + widest)
    if name == "join" and args:
        items = args[0]
        return meter.size(items) + len(text) * len(items)
    return len(text)


def _filter_size(meter: _Meter, name: str, args: tuple, kwargs: dict) -> int:
    """An upper bound of what the filter `name` makes, for the filters that can grow a value."""
    value, rest = (args[0], args[1:]) if args else (None, ())
    text = value if isinstance(value, str) else ""
    if name == "center":
        return meter.size(value) + _widest(*rest, *kwargs.values())
    if name == "indent":
        width = rest[0] if rest else kwargs.get("width", 4)
        per_line = len(width) if isinstance(width, str) else _widest(width)
        return len(text) + (text.count("\n") + 1) * per_line
    if name == "format":
        return _printf_size(meter, text, tuple(rest) or kwargs)
    if name == "replace" and len(rest) >= 2:
        return _str_method_size(meter, text, "replace", (str(rest[0]), str(rest[1])), {})
    if name == "join":
        separator = rest[0] if rest else kwargs.get("d", "")
        return meter.size(value) + len(str(separator)) * len(value)
    if name == "sum" and not isinstance(rest[1] if len(rest) > 1 else kwargs.get("start", 0), int | float):
        raise ChatTemplateError("the sum filter adds numbers only here")
    return 0


_COMPARISONS: dict[str, Callable[[Any, Any], Any]] = {
    "eq": operator.eq,
    "ne": operator.ne,
    "gt": operator.gt,
    "gteq": operator.ge,
    "lt": operator.lt,
    "lteq": operator.le,
    "in": lambda item, container: item in container,
    "notin": lambda item, container: item not in container,
}


class _BoundedSandbox(ImmutableSandboxedEnvironment):
    code_generator_class = _Generator
    intercepted_binops = frozenset({"+", "-", "*", "/", "//", "%", "**"})

    def __init__(self) -> None:
        super().__init__(trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTracker, loopcontrols])
        self.finalize = self._finalize
        self.concat = self._join  # what macros and blocks return: their output, joined
        self.globals.pop("lipsum", None)
        self.globals.update(
            range=_range,
            raise_exception=_raise_exception,
            strftime_now=_strftime_now,
            dict=_TemplateDict(),
            namespace=_TemplateNamespace,
        )
        for name in _DROPPED_FILTERS:
            self.filters.pop(name, None)
        self.filters["tojson"] = _tojson
        self.filters = {name: _metered_filter(name, function) for name, function in self.filters.items()}
        self.tests = {name: _metered_test(function) for name, function in self.tests.items()}

    def is_safe_attribute(self, obj: Any, attr: str, value: Any) -> bool:
        if isinstance(obj, str | bytes):
            return attr in _STR_METHODS and isinstance(obj, str)
        if isinstance(obj, int | float):
            return attr in _NUMBER_ATTRIBUTES
        if isinstance(obj, list | tuple | dict | set | frozenset | range):
            return attr in _CONTAINER_METHODS or (isinstance(obj, range) and attr in ("start", "stop", "step"))
        return super().is_safe_attribute(obj, attr, value)

    def getattr(self, obj: Any, attribute: str) -> Any:
        _meter().step()
        return super().getattr(obj, attribute)

    def getitem(self, obj: Any, argument: Any) -> Any:
        meter = _meter()
        meter.step()
        meter.check(argument)  # a key is hashed
        return super().getitem(obj, argument)

    def call_binop(self, context: jinja2.runtime.Context, operator: str, left: Any, right: Any) -> Any:
        meter = _meter()
        meter.step()
        meter.check(left, right)
        numbers = isinstance(left, int) and isinstance(right, int)
        if operator == "**" and numbers:
            meter.allow(max(left.bit_length(), 1) * max(right, 0) // 3, "a number")
        elif operator == "*" and numbers:
            meter.allow((left.bit_length() + right.bit_length()) // 3, "a number")
        elif operator == "*" and (isinstance(left, int) or isinstance(right, int)):
            sequence, times = (right, left) if isinstance(left, int) else (left, right)
            meter.allow(meter.size(sequence) * max(times, 0), "a repetition")
        elif operator == "+" and not numbers:
            meter.allow(meter.size(left) + meter.size(right), "a concatenation")
        elif operator == "%" and isinstance(left, str):
            meter.allow(_printf_size(meter, left, right), "a formatted string")
        result = super().call_binop(context, operator, left, right)
        meter.check(result)
        return result

    def call(__self, __context: jinja2.runtime.Context, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805
        if __obj == __self.metered_loop:  # a loop's own iterable: counted as it is iterated
            return __self.metered_loop(*args)
        meter = _meter()
        meter.step()
        if isinstance(__obj, LoopContext) and args:  # a recursive loop's next level
            args = (meter.items(args[0], "a loop"), *args[1:])
        args = tuple(_metered_argument(meter, a) for a in args)
        kwargs = {k: _metered_argument(meter, v) for k, v in kwargs.items()}
        meter.check(*args, *kwargs.values())
        target = getattr(__obj, "__wrapped__", __obj)  # str.format comes wrapped by the sandbox
        owner = getattr(target, "__self__", None)
        if isinstance(owner, str):
            if target.__name__ == "join" and args:
                args = (list(meter.items(args[0], "a join")), *args[1:])
            meter.allow(_str_method_size(meter, owner, target.__name__, args, kwargs), f"a str.{target.__name__}")
        result = super().call(__context, __obj, *args, **kwargs)
        meter.check(result)
        return result

    def metered_loop(self, iterable: Any) -> Iterator[Any]:
        meter = _meter()
        for item in iterable:
            meter.step()
            yield item

    def metered_compare(self, left: Any, *chain: Any) -> bool:
        """`left op1 right1 op2 right2 ...` as Python chains comparisons, each side sized first."""
        meter = _meter()
        meter.step()
        meter.check(left, *chain[1::2])
        for name, right in zip(chain[::2], chain[1::2], strict=True):
            if not _COMPARISONS[name](left, right):
                return False
            left = right
        return True

    def metered_dict(self, items: tuple) -> dict:
        meter = _meter()
        meter.step()
        meter.check(*(key for key, _ in items))  # each key is hashed
        return dict(items)

    def metered_concat(self, parts: tuple) -> str:
        meter = _meter()
        meter.step()
        meter.allow(sum(meter.size(part) for part in parts), "a concatenation")
        return "".join(map(str, parts))

    def _join(self, parts: Iterable[str]) -> str:
        meter = _meter()
        parts = list(parts)
        meter.allow(sum(len(part) for part in parts), "a block's output")
        return "".join(parts)

    def _finalize(self, value: Any) -> Any:
        meter = _meter()
        meter.step()
        size = meter.size(value)
        meter.allow(size, "an output")
        meter.output += size
        meter.allow(meter.output // OUTPUT_PASSES, "an output, counting what macros and blocks made,")
        return value


def _metered_argument(meter: _Meter, value: Any) -> Any:
    if isinstance(value, Iterator) and not isinstance(value, LoopContext):
        return meter.items(value, "a sequence")
    return value


def _metered_filter(name: str, function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)  # keeps Jinja's pass_context / pass_eval_context marks
    def metered(*args: Any, **kwargs: Any) -> Any:
        meter = _meter()
        meter.step()
        args = tuple(_metered_argument(meter, a) for a in args)
        kwargs = {k: _metered_argument(meter, v) for k, v in kwargs.items()}
        values = tuple(a for a in args if not isinstance(a, jinja2.runtime.Context | nodes.EvalContext))
        if name == "join" and values and isinstance(values[0], Iterator):
            materialised = list(values[0])
            args = tuple(materialised if a is values[0] else a for a in args)
            values = (materialised, *values[1:])
        meter.check(*values, *kwargs.values())
        meter.allow(_filter_size(meter, name, values, kwargs), f"a '{name}' result")
        result = function(*args, **kwargs)
        meter.check(result)
        return result

    return metered


def _metered_test(function: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(function)
    def metered(*args: Any, **kwargs: Any) -> Any:
        meter = _meter()
        meter.step()
        meter.check(*(a for a in args if not isinstance(a, jinja2.runtime.Context | nodes.EvalContext)))
        return function(*args, **kwargs)

    return metered


_environment = _BoundedSandbox()


@functools.lru_cache(maxsize=256)
def _compile(template: str) -> jinja2.Template:
    if len(template) > MAX_TEMPLATE_CHARS:
        raise ChatTemplateError(f"the chat template is {len(template)} characters; at most {MAX_TEMPLATE_CHARS}")
    try:
        return _environment.from_string(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ChatTemplateError(f"the chat template is not valid Jinja (line {exc.lineno}): {exc.message}") from None
    except (RecursionError, MemoryError):
        raise ChatTemplateError("the chat template is nested too deeply to compile") from None


# --- rendering --------------------------------------------------------------------------------------


def render(
    template: str,
    messages: list[dict[str, Any]],
    *,
    budget: TemplateBudget,
    variables: Mapping[str, Any] | None = None,
    add_generation_prompt: bool = False,
    spans: bool = False,
    tools: list[dict[str, Any]] | None = None,
) -> tuple[str, list[tuple[int, int]]]:
    """The text `template` renders for `messages` (keys whose value is None dropped, as transformers does)
    and `tools` (OpenAI's function tools, as `apply_chat_template(tools=...)` passes them), and, with
    `spans`, the (start, end) characters of its `{% generation %}` blocks."""
    compiled = _compile(template)
    conversation = [{k: v for k, v in message.items() if v is not None} for message in messages]
    meter = _Meter(budget, [] if spans else None)
    outer = getattr(_active, "meter", None)
    _active.meter = meter
    pieces = []
    try:
        for piece in compiled.generate(
            {**(variables or {}), "messages": conversation, "tools": tools or None, "documents": None},
            add_generation_prompt=add_generation_prompt,
        ):
            meter.rendered += len(piece)
            meter.allow(meter.rendered, "an output")
            pieces.append(piece)
    except ChatTemplateError:
        raise
    except jinja2.TemplateError as exc:
        raise ChatTemplateError(f"the chat template failed: {exc.message or type(exc).__name__}") from None
    except (RecursionError, MemoryError):
        raise ChatTemplateError("the chat template recursed too deeply") from None
    except Exception as exc:  # the template's own error (a TypeError, a ZeroDivisionError): its fault
        raise ChatTemplateError(f"the chat template failed: {type(exc).__name__}: {exc}") from None
    finally:
        _active.meter = outer
    return "".join(pieces), meter.spans or []


def render_for(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    *,
    budget: TemplateBudget,
    chat_template: str | None = None,
    add_generation_prompt: bool = False,
    spans: bool = False,
    tools: list[dict[str, Any]] | None = None,
) -> tuple[str, list[tuple[int, int]]]:
    """`render` with the tokenizer's template (or `chat_template`) and its special tokens, as
    `tokenizer.apply_chat_template(..., tools=tools, tokenize=False)` would."""
    return render(
        tokenizer.get_chat_template(chat_template),
        messages,
        budget=budget,
        variables=tokenizer.special_tokens_map,
        add_generation_prompt=add_generation_prompt,
        spans=spans,
        tools=tools,
    )


def chat_text(
    tokenizer: PreTrainedTokenizerBase,
    messages: list[dict[str, Any]],
    *,
    budget: TemplateBudget,
    chat_template: str | None = None,
    add_generation_prompt: bool = False,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    text, _ = render_for(
        tokenizer,
        messages,
        budget=budget,
        chat_template=chat_template,
        add_generation_prompt=add_generation_prompt,
        tools=tools,
    )
    return text


def template_messages(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Canonical messages (`data.chat`) as chat templates take them: role and content; an assistant's
    `tool_calls` with their arguments as objects (templates write them with `tojson`, as transformers'
    documentation asks); a tool message's `tool_call_id` and the `name` of the function it answers.
    "weight" is ours, not the model's."""
    names: dict[str, str] = {}
    out = []
    for message in messages:
        turn: dict[str, Any] = {"role": message["role"], "content": content_text(message.get("content")) or ""}
        if message.get("tool_calls"):
            turn["tool_calls"] = []
            for call in message["tool_calls"]:
                arguments = call["function"]["arguments"]
                function = {"name": call["function"]["name"], "arguments": _arguments(arguments)}
                turn["tool_calls"].append({"id": call["id"], "type": "function", "function": function})
                names[call["id"]] = call["function"]["name"]
        if message["role"] == "tool":
            turn["tool_call_id"] = message["tool_call_id"]
            if message["tool_call_id"] in names:
                turn["name"] = names[message["tool_call_id"]]
        out.append(turn)
    return out


def _arguments(arguments: Any) -> Any:
    if not isinstance(arguments, str):
        return arguments
    try:
        return json.loads(arguments)
    except (json.JSONDecodeError, RecursionError):
        return arguments  # the template gets what it was given; validation refuses such records earlier


def document_ids(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    """A document as continued pre-training sees it: the tokenizer's own start (bos, when it adds one), the
    text, and the end-of-text token so the model learns where documents end. No chat template."""
    ids = list(tokenizer(text)["input_ids"])
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    return ids


def stored_chat_template(directory: Path, *, max_json_depth: int) -> tuple[str, str] | None:
    """The chat template saved in a model or adapter directory and the file it is in: `chat_template.jinja`,
    else `tokenizer_config.json`'s `chat_template` (a string, or the "default" of a list of named ones);
    None when there is none. ChatTemplateError, naming the file, when the file cannot be read."""
    jinja, config = (directory / name for name in _CONFIG_FILES)
    try:
        if jinja.is_file():
            return jinja.read_text(encoding="utf-8"), jinja.name
        if not config.is_file():
            return None
        settings = loads(config.read_bytes(), max_depth=max_json_depth)
    except (UnicodeDecodeError, UntrustedJSONError) as exc:
        raise ChatTemplateError(f"{jinja.name if jinja.is_file() else config.name}: {exc}") from None
    template = settings.get("chat_template") if isinstance(settings, dict) else None
    if isinstance(template, list):
        named = {item.get("name"): item.get("template") for item in template if isinstance(item, dict)}
        template = named.get("default")
    return (template, config.name) if isinstance(template, str) and template.strip() else None


# Conversations a chat template is tried on when it arrives: it must render one of them within its budget.
SAMPLE_CONVERSATIONS = (
    [
        {"role": "system", "content": "You are a helpful assistant."},
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ],
    [
        {"role": "user", "content": "What is the capital of France?"},
        {"role": "assistant", "content": "Paris."},
        {"role": "user", "content": "And of Italy?"},
    ],
)


def check_template(template: str, *, budget: TemplateBudget, variables: Mapping[str, Any]) -> None:
    """ChatTemplateError unless `template` renders a sample conversation within `budget` (one that refuses
    a system turn is tried without one); over the budget on any sample is refused at once."""
    failure: ChatTemplateError | None = None
    for sample in SAMPLE_CONVERSATIONS:
        try:
            render(template, sample, budget=budget, variables=variables, add_generation_prompt=True)
            return
        except TemplateBudgetExceeded:
            raise
        except ChatTemplateError as exc:
            failure = failure or exc
    raise ChatTemplateError(f"it cannot render a plain conversation: {failure}")
