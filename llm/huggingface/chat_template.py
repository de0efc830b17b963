"""The jinja chat template of an exported folder: the same tokens as Tokenizer.render_conversation.

    apply_chat_template(messages)                              == render_conversation(conv)[0]
    apply_chat_template(messages, add_generation_prompt=True)  == render_for_completion(conv)

Messages are our conversation schema (llm/conversation.py), which is also transformers' message format:
a system message is merged into the first user turn ("system\\n\\nuser"), an assistant's content is a str
or a list of parts, text / python (a tool call, between python_start and python_end) / python_output
(the tool's answer, between output_start and output_end). As in render_for_completion, the generation
prompt replaces a final assistant message. Each span between special tokens is tokenized as one text;
so are two *adjacent* text parts, which render_conversation encodes one by one (their tokens can differ
at the seam; tasks and the engine never write two text parts in a row).

Whitespace control (`{%-` / `-%}`) everywhere: the template emits nothing but the tokens' text.
"""

CHAT_TEMPLATE = """\
{%- if messages[0]['role'] == 'system' -%}
  {%- set system = messages[0]['content'] -%}
  {%- set messages = messages[1:] -%}
{%- else -%}
  {%- set system = none -%}
{%- endif -%}
{%- if add_generation_prompt and messages[-1]['role'] == 'assistant' -%}
  {%- set messages = messages[:-1] -%}
{%- endif -%}
<|bos|>
{%- for message in messages -%}
  {%- if message['role'] == 'user' -%}
    {%- if message['content'] is not string -%}
      {{- raise_exception('user content must be a string') -}}
    {%- endif -%}
    <|user_start|>
    {%- if loop.first and system is not none -%}{{- system ~ '\\n\\n' -}}{%- endif -%}
    {{- message['content'] -}}
    <|user_end|>
  {%- elif message['role'] == 'assistant' -%}
    <|assistant_start|>
    {%- if message['content'] is string -%}
      {{- message['content'] -}}
    {%- else -%}
      {%- for part in message['content'] -%}
        {%- if part['type'] == 'text' -%}
          {{- part['text'] -}}
        {%- elif part['type'] == 'python' -%}
          <|python_start|>{{- part['text'] -}}<|python_end|>
        {%- elif part['type'] == 'python_output' -%}
          <|output_start|>{{- part['text'] -}}<|output_end|>
        {%- else -%}
          {{- raise_exception('assistant part type must be text, python or python_output') -}}
        {%- endif -%}
      {%- endfor -%}
    {%- endif -%}
    <|assistant_end|>
  {%- else -%}
    {{- raise_exception('roles are system (first only), user and assistant') -}}
  {%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}
  <|assistant_start|>
{%- endif -%}
"""
