"""OpenAI request bodies as pydantic models: the fields we honour are typed and bounded (a bad value is a 400 naming
the field); unknown fields are accepted and ignored, as OpenAI-compatible servers do.

The diffusion knobs (every one of `canvaslm.knobs`, with its range) are extra top-level fields (the `openai` client
sends them with `extra_body`), `decoding` (a diffusion model's way to write: diffusion, verified or autoregressive;
the last two take temperature/top_p/top_k), and `canvas_drafts`
(stream whole-canvas drafts in a `canvaslm` field the OpenAI client ignores); `ignore_eos` (vLLM's: write
max_tokens tokens whatever the model says, for benchmarks)."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from canvaslm.knobs import DECODING, KNOBS, Knob, knobs

NonNegativeInt = Annotated[int, Field(ge=0)]
TokenIds = Annotated[list[NonNegativeInt], Field(min_length=1)]


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class JSONSchemaFormat(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    name: str = "response"
    json_schema: dict[str, Any] = Field(alias="schema")
    strict: bool | None = None


class ResponseFormat(BaseModel):
    """OpenAI's `response_format`: "text", "json_object" (any JSON object) or "json_schema" (validates)."""
    model_config = ConfigDict(extra="allow")
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JSONSchemaFormat | None = None

    @model_validator(mode="after")
    def _has_schema(self) -> ResponseFormat:
        if self.type == "json_schema" and self.json_schema is None:
            raise ValueError('type "json_schema" needs a json_schema object with a "schema"')
        return self

    def target_schema(self) -> dict[str, Any] | None:
        """The schema the answer must validate against (json_schema only)."""
        return self.json_schema.json_schema if self.json_schema is not None and self.type == "json_schema" else None


def _knob_field(knob: Knob) -> tuple[Any, Any]:
    """The request field of a knob: optional (None = the model's default), with the knob's range."""
    bounds: dict[str, Any] = {}
    if knob.low is not None:
        bounds["gt" if knob.low_open else "ge"] = knob.low
    if knob.high is not None:
        bounds["le"] = knob.high
    kind = Literal[knob.choices] if knob.choices else knob.kind  # type: ignore[valid-type]
    return kind | None, Field(None, description=knob.help, **bounds)


# every sampling knob of canvaslm.knobs, as a request field
Knobs = create_model("Knobs", __config__=ConfigDict(extra="allow"), **{k.name: _knob_field(k) for k in KNOBS})


class Sampling(Knobs):  # type: ignore[valid-type, misc]
    """Fields shared by both endpoints."""

    model_config = ConfigDict(extra="allow")
    model: str | None = None
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | Annotated[list[str], Field(max_length=4)] | None = None
    seed: int | None = Field(None, ge=0, lt=2**63)
    canvas_drafts: bool = False
    ignore_eos: bool = False
    response_format: ResponseFormat | None = None
    decoding: Literal[DECODING] | None = None  # type: ignore[valid-type]  # None: the server's default

    def stops(self) -> list[str]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return [s for s in stops if s]

    def sampling(self, diffusion: bool) -> dict[str, Any]:
        """The options for the model: diffusion knobs for diffusion decoding (temperature/top_p/top_k, which
        OpenAI clients send by habit, do not apply to its schedule and are ignored), AR options otherwise."""
        names = [k.name for k in knobs("diffusion" if diffusion else "ar")]
        return {k: getattr(self, k) for k in names if getattr(self, k) is not None}


class CompletionRequest(Sampling):
    prompt: str | Annotated[list[str], Field(min_length=1, max_length=1)] | TokenIds | \
        Annotated[list[TokenIds], Field(min_length=1, max_length=1)]
    suffix: str | None = None
    max_tokens: int = Field(16, ge=1)
    echo: bool = False


class TextPart(BaseModel):
    model_config = ConfigDict(extra="allow")
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(Sampling):
    messages: Annotated[list[Message], Field(min_length=1)]
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _budget(self) -> ChatRequest:
        # max_completion_tokens is OpenAI's current name; max_tokens the deprecated one
        self.max_completion_tokens = self.max_completion_tokens or self.max_tokens
        return self
