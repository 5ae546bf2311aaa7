"""Every span and attribute name Arclight writes or reads, in one place.

Our own names live under ``arclight.*``. The other groups are the keys that common
instrumentations write and that the SQL pipeline reads (GenAI semantic conventions,
OpenLLMetry, OpenInference, AgentOps, AutoGen, LangGraph) plus what Agent Lightning v0.x writes,
read for compatibility. ``sql/`` files use the same strings; ``tests/test_span_conventions_doc.py``
checks that every key a SQL file reads is declared here and named in docs/span-conventions.md.
"""

from __future__ import annotations

# --- Rollout context: resource attributes set by the tracing SDK and the runner -------------
RUN_ID = "arclight.run_id"
EPOCH = "arclight.epoch"
ROLLOUT_ID = "arclight.rollout_id"
TASK_ID = "arclight.task_id"
ATTEMPT = "arclight.attempt"
SERVICE_NAME = "service.name"  # OpenTelemetry resource convention
SERVICE_INSTANCE_ID = "service.instance.id"  # which gateway process (host:pid) recorded a span

ROLLOUT_CONTEXT_KEYS = (RUN_ID, EPOCH, ROLLOUT_ID, TASK_ID, ATTEMPT)

# --- Span kinds Arclight's SDK and gateway write (attribute ``arclight.span.kind``) ----------
SPAN_KIND = "arclight.span.kind"
KIND_AGENT = "agent"
KIND_TOOL = "tool"
KIND_REWARD = "reward"
KIND_MESSAGE = "message"
KIND_LLM = "llm"
KIND_ROLLOUT = "rollout"
KIND_ROLLOUT_OUTCOME = "rollout_outcome"

# Span names written by the SDK (the kind attribute is authoritative; names are for people).
SPAN_NAME_AGENT = "agent {name}"
SPAN_NAME_TOOL = "tool {name}"
SPAN_NAME_REWARD = "reward {name}"
SPAN_NAME_REWARD_FUNCTION = "reward function {name}"
SPAN_NAME_MESSAGE = "message"
SPAN_NAME_ROLLOUT = "rollout"
SPAN_NAME_ROLLOUT_OUTCOME = "rollout outcome"

# --- Arclight attributes --------------------------------------------------------------------
AGENT_NAME = "agent.name"  # shared with OpenInference's Agents SDK instrumentation
TOOL_NAME = "tool.name"
# A tool span's own reward, a number, for the model call that caused the tool call (sql/rewards.sql charges it
# like a failed tool call: kind 'tool_reward'); pipeline.advantage = turn counts it in that call's step reward.
TOOL_REWARD = "arclight.tool.reward"
REWARD_NAME = "arclight.reward.name"
REWARD_VALUE = "arclight.reward.value"
MESSAGE_ROLE = "arclight.message.role"
MESSAGE_CONTENT = "arclight.message.content"
ATTRIBUTES_DROPPED = "arclight.attributes.coerced"  # keys whose values the SDK had to coerce

# Gateway LLM-call spans (authoritative token ids and logprobs).
PROMPT_TOKEN_IDS = "arclight.llm.prompt_token_ids"
RESPONSE_TOKEN_IDS = "arclight.llm.response_token_ids"
RESPONSE_LOGPROBS = "arclight.llm.response_logprobs"
REQUEST_MESSAGES = "arclight.llm.request_messages"  # JSON list of chat messages
RESPONSE_TEXT = "arclight.llm.response_text"
POLICY_VERSION = "arclight.policy.version"
SERVED_MODEL = "arclight.llm.served_model"
LLM_LATENCY_MS = "arclight.llm.latency_ms"
LLM_STREAMED = "arclight.llm.streamed"
REQUEST_PROMPT = "arclight.llm.request_prompt"  # /v1/completions prompt (JSON when not a string)
REQUEST_PARAMS = "arclight.llm.request_params"  # JSON of the sampling parameters sent to vLLM
RESPONSE_TOOL_CALLS = "arclight.llm.response_tool_calls"  # JSON list of tool calls, when any
CHOICE_INDEX = "arclight.llm.choice_index"  # n > 1: one span per choice, same response id
POLICY_NAME = "arclight.policy.name"
LLM_REPLICA = "arclight.llm.replica"  # URL of the vLLM replica that answered
GEN_AI_RESPONSE_FINISH_REASONS = "gen_ai.response.finish_reasons"
ERROR_TYPE = "error.type"  # OpenTelemetry convention: set on failed calls
LLM_UPSTREAM_FAILED = "arclight.llm.upstream_failed"  # true on a gateway call our side failed (vLLM down, 5xx, timeout)

# Prompt versions (resources.prompts): a resource attribute per prompt the rollout ran with.
PROMPT_VERSION = "arclight.prompt.{name}.version"


def prompt_version_key(name: str) -> str:
    """Return the resource attribute that carries the version of prompt ``name``."""
    return PROMPT_VERSION.format(name=name)


# Prompt optimisation: spans of the critic's calls carry its role.
APO_ROLE = "arclight.apo.role"  # reflect (GEPA's reflection prompt)
APO_PARENT_VERSION = "arclight.apo.parent_version"

# Rollout outcome spans written by the runner.
ROLLOUT_STATUS = "arclight.rollout.status"  # succeeded | failed | timed_out
ROLLOUT_ERROR = "arclight.rollout.error"
ROLLOUT_ERROR_KIND = "arclight.rollout.error_kind"  # agent | timeout | infrastructure: whose failure it was

# --- OpenTelemetry GenAI semantic conventions -----------------------------------------------
GEN_AI_OPERATION_NAME = "gen_ai.operation.name"  # "chat", "text_completion", ...
GEN_AI_SYSTEM = "gen_ai.system"
CLIENT_ADDRESS = "client.address"  # OTel semconv: the address the call came from (which host ran the agent)
GEN_AI_REQUEST_MODEL = "gen_ai.request.model"
GEN_AI_RESPONSE_MODEL = "gen_ai.response.model"
GEN_AI_RESPONSE_ID = "gen_ai.response.id"
GEN_AI_USAGE_INPUT_TOKENS = "gen_ai.usage.input_tokens"
GEN_AI_USAGE_OUTPUT_TOKENS = "gen_ai.usage.output_tokens"
GEN_AI_INPUT_MESSAGES = "gen_ai.input.messages"  # current OpenLLMetry: JSON with "parts"
GEN_AI_OUTPUT_MESSAGES = "gen_ai.output.messages"
GEN_AI_AGENT_NAME = "gen_ai.agent.name"
GEN_AI_TASK_NAME = "gen_ai.task.name"
GEN_AI_TOOL_NAME = "gen_ai.tool.name"
# OpenLLMetry before 0.55: flattened prompt/completion attributes, N = 0, 1, ...
GEN_AI_PROMPT_PREFIX = "gen_ai.prompt."  # gen_ai.prompt.N.role / .content
GEN_AI_COMPLETION_PREFIX = "gen_ai.completion."  # gen_ai.completion.N.role / .content
LLM_REQUEST_TYPE = "llm.request.type"  # older OpenLLMetry, AgentOps: "chat"
GEN_AI_REQUEST_TYPE = "gen_ai.request.type"  # newer AgentOps: "chat"
GEN_AI_USAGE_PROMPT_TOKENS = "gen_ai.usage.prompt_tokens"  # older OpenLLMetry, AgentOps
GEN_AI_USAGE_COMPLETION_TOKENS = "gen_ai.usage.completion_tokens"
TRACELOOP_LANGGRAPH_NODE = "traceloop.association.properties.langgraph_node"
TRACELOOP_SPAN_KIND = "traceloop.span.kind"

# --- OpenInference ---------------------------------------------------------------------------
OPENINFERENCE_SPAN_KIND = "openinference.span.kind"  # "LLM", "AGENT", "CHAIN", "TOOL"
OI_INPUT_VALUE = "input.value"
OI_OUTPUT_VALUE = "output.value"  # raw response JSON; the response id lives only in here
OI_INPUT_MESSAGES_PREFIX = "llm.input_messages."  # llm.input_messages.N.message.role/content
OI_OUTPUT_MESSAGES_PREFIX = "llm.output_messages."
OI_MODEL_NAME = "llm.model_name"
OI_METADATA = "metadata"  # JSON; LangGraph puts "langgraph_node" in it
OI_GRAPH_NODE_ID = "graph.node.id"  # the agent's name on an AGENT span (AutoGen AgentChat, CrewAI instrumentations)
# Where a response id sits inside ``output.value``: the OpenAI response (``$.id``), or LangChain's
# LLMResult (its llm_output, or the first generation's message metadata, serialised or not).
OI_OUTPUT_RESPONSE_ID_PATHS = (
    "$.id",
    "$.llm_output.id",
    "$.generations[0][0].message.kwargs.response_metadata.id",
    "$.generations[0][0].message.response_metadata.id",
)

# --- Framework agent markers -----------------------------------------------------------------
AUTOGEN_RECIPIENT_AGENT_TYPE = "recipient_agent_type"  # "<agent>_<team uuid>": the uuid is dropped
LANGCHAIN_CHAIN_TYPE = "langchain.chain.type"
AGENTOPS_SPAN_KIND = "agentops.span.kind"  # "agent"
AGENTOPS_OPERATION_NAME = "operation.name"
EXECUTOR_ID = "executor.id"

# --- Agent Lightning (v0.x) compatibility: what its tracers and emitters write ------------------
AGENTLIGHTNING_REWARD_PREFIX = "agentlightning.reward."  # agentlightning.reward.N.value / .name
# Its OpenAI instrumentation (AgentOps, patched) names LLM spans ``openai.chat.completion`` and
# adds the token ids vLLM returned as int arrays, and the logprobs as JSON.
AGENTLIGHTNING_LLM_SPAN_NAME = "openai.chat.completion"  # its default llm_call_match
AGENTLIGHTNING_PROMPT_TOKEN_IDS = "prompt_token_ids"  # int[]
AGENTLIGHTNING_RESPONSE_TOKEN_IDS = "response_token_ids"  # int[]
AGENTLIGHTNING_LOGPROBS_CONTENT = "logprobs.content"  # JSON list of {token, logprob, ...}
# Rewards: AgentOps' operation output ``{"type": "reward", "value": v}`` (JSON text) ...
AGENTOPS_TASK_OUTPUT = "agentops.task.output"
AGENTOPS_ENTITY_OUTPUT = "agentops.entity.output"  # older AgentOps
AGENTOPS_REWARD_TYPE = "reward"  # the payload's "type"
# ... or, before v0.3, an ``agentlightning.annotation`` span with a ``reward`` attribute.
AGENTLIGHTNING_ANNOTATION_SPAN_NAME = "agentlightning.annotation"
AGENTLIGHTNING_LEGACY_REWARD = "reward"
# A reward function is an ``agentlightning.operation`` span whose operation name is
# ``agentlightning.reward``: LLM calls inside it (a judge) are not training data.
AGENTLIGHTNING_OPERATION_SPAN_NAME = "agentlightning.operation"
AGENTLIGHTNING_OPERATION_NAME = "agentlightning.operation.name"
AGENTLIGHTNING_REWARD_OPERATION = "agentlightning.reward"
# Resource attribute its OTLP exporter sets; the collector takes it when arclight.rollout_id is absent.
AGENTLIGHTNING_ROLLOUT_ID = "agentlightning.rollout_id"


def agentlightning_reward_value(index: int) -> str:
    """Return Agent Lightning's attribute key for the value of reward number ``index``."""
    return f"{AGENTLIGHTNING_REWARD_PREFIX}{index}.value"


# --- Lake layout ------------------------------------------------------------------------------
PRODUCTION_PARTITION = "production"  # spans that carry no run id, partitioned by date


# --- Keys the SQL pipeline (sql/) reads in addition to the above -------------------------------
GEN_AI_OPERATION_CHAT = "chat"
GEN_AI_OPERATION_TEXT_COMPLETION = "text_completion"
GEN_AI_OPERATION_EXECUTE_TOOL = "execute_tool"
GEN_AI_OPERATION_INVOKE_AGENT = "invoke_agent"
OI_KIND_LLM = "LLM"
OI_KIND_AGENT = "AGENT"
OI_KIND_TOOL = "TOOL"
OI_METADATA_LANGGRAPH_NODE = "langgraph_node"  # key inside OpenInference's ``metadata`` JSON
AGENTOPS_KIND_AGENT = "agent"
AGENTOPS_KIND_TOOL = "tool"
TRACELOOP_KIND_TOOL = "tool"
AGENTLIGHTNING_REWARD_0_VALUE = "agentlightning.reward.0.value"
AGENTLIGHTNING_REWARD_0_NAME = "agentlightning.reward.0.name"
EXCEPTION_EVENT = "exception"  # OpenTelemetry event name recorded by span.record_exception
REWARD_INVALID = "arclight.reward.invalid"  # set by emit_reward when the value was not a number
# Span attributes that carry the rollout context when a span's resource cannot (the gateway
# serves many rollouts from one process): same strings as the resource keys.
SPAN_ROLLOUT_CONTEXT_KEYS = (ROLLOUT_ID, TASK_ID, ATTEMPT)
