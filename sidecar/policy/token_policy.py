"""The `tokens` section of a model's policy: how an LLM request's cost is read from its body,
made good from its response, and what becomes of a request its class's objective cannot hold.
Re-exported by `sidecar.policy.model`; declared here to keep that module within its size.
"""

from __future__ import annotations

from sidecar.policy.choices import Infeasible, UnreadableBody
from sidecar.policy.spec import NAME, Choice, Exclusive, Int, Num, section, setting


@section(
    "tokens",
    "Charge `cost` buckets by tokens: prompt_weight * prompt tokens + output_weight * output "
    "tokens. Needs the ext_proc mode; ext_authz modes never see bodies and charge "
    "cost_per_request.",
    rules=(
        Exclusive(("prompt_tokens", "prompt_text")),
        Exclusive(("output_tokens", "output_text")),
    ),
)
class TokenPolicy:
    """How an LLM request's cost is estimated from its body at admission, and reconciled with
    what it really used when its response ends (ext_proc mode, which sees both bodies).

    Names are looked up in the request and response (see `sidecar.core.tokens`): a KServe v2
    input or output tensor of that name, else a top-level field (generate endpoints), else an
    entry of `parameters`. Cost = prompt_weight * prompt tokens + output_weight * output tokens,
    with output tokens = the request's max tokens at admission and the generated count after.
    """

    prompt_tokens: str | None = setting(
        NAME,
        "Request input (tensor, JSON field or parameter) that holds the prompt length in tokens.",
        default=None,
    )
    prompt_text: str | None = setting(
        NAME,
        "Instead of prompt_tokens: request input that holds the prompt text, counted as "
        "characters / chars_per_token.",
        default=None,
    )
    max_tokens: str | None = setting(
        NAME, "Request input that holds the most tokens the request may generate.", default=None
    )
    default_max_tokens: int = setting(
        Int(minimum=1),
        "Output tokens assumed at admission when the request has no max_tokens.",
        default=256,
    )
    output_tokens: str | None = setting(
        NAME,
        "Response output (tensor or JSON field) that holds the tokens generated, summed "
        "over streamed responses.",
        default=None,
    )
    output_text: str | None = setting(
        NAME,
        "Instead of output_tokens: response output that holds the generated text, counted "
        "as characters / chars_per_token and summed over streamed responses.",
        default=None,
    )
    response_prompt_tokens: str | None = setting(
        NAME,
        "Response output (tensor or JSON field) that holds the prompt tokens the model "
        "counted (e.g. vLLM's `num_input_tokens`); when the response has it, the prompt part "
        "of the cost is made good with it, charging or refunding the difference.",
        default=None,
    )
    unreadable: UnreadableBody = setting(
        Choice.of(UnreadableBody),
        "A request body whose cost cannot be read (an encoding Triton does not read, not "
        "JSON, the prompt missing, over 8 MiB inflated): refuse answers 415 "
        "(encoding) or 400 with a JSON reason; charge_max admits it at the largest cost "
        "every cost bucket of the tenant can hold (their smallest burst), made good if the "
        "response reports its prompt and output tokens. Default refuse: Triton itself "
        "refuses almost every such body, so refusing it first costs an honest client "
        "nothing, and no body can cost less than it runs.",
        default=UnreadableBody.REFUSE,
    )
    chars_per_token: float = setting(
        Num(exclusive_minimum=0),
        "Characters per token, to count prompt_text and output_text in tokens.",
        default=4.0,
    )
    prompt_weight: float = setting(Num(minimum=0), "Cost units per prompt token.", default=1.0)
    output_weight: float = setting(
        Num(minimum=0),
        "Cost units per output token: max tokens at admission, tokens generated once the "
        "response ends.",
        default=1.0,
    )
    infeasible: Infeasible = setting(
        Choice.of(Infeasible),
        "A request whose max tokens cannot be generated within its class's "
        "latency_objective_ms: at the least seconds per generated token among this model's last"
        " 256 settled responses that generated at least as many tokens from a prompt no longer,"
        " or with none that long among the 8 longest from such prompts (under load, the pace of"
        " the batches the model runs now; judged from 8 responses on). refuse answers 422 "
        "`infeasible` at once, saying the most max tokens the class can take; relegate moves it"
        " to its class's relegate_to (served as asked in a class without one); admit serves it "
        "as asked. Judged on the max tokens asked for: a client that asks for far more than it "
        "generates is judged by that.",
        default=Infeasible.ADMIT,
    )
