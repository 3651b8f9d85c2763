"""Tiny random checkpoints of the real image-text-to-text families, built offline (test fixtures).

`build_tiny_family(name, out)` builds, randomly initialises and saves (model + processor with
`save_pretrained`) a few-hundred-K-parameter checkpoint of one family: the real architecture
class, the real processor class with its PIL (torchvision-free) image processor, that family's
real chat template (verbatim, source named next to each constant) and its real special tokens
with the same bos/eos/pad roles. Only the sizes are tiny, and the vocabulary, trained on the toy
corpus with the family's special tokens first, in the tokenizer kind of the real checkpoint:
byte-level BPE for SmolVLM, Qwen, InternVL and OneVision (toy.build_tiny_tokenizer), and
SentencePiece-style BPE ("▁" for spaces, byte fallback) built with the real tokenizer class for
LLaVA-NeXT-Mistral (LlamaTokenizer, the legacy layout that prefixes a space to text after each
special token) and Gemma 3 (GemmaTokenizer), so that tokenisation boundary effects are tested.

Families whose processor has a video processor (SmolVLM2, Qwen2-VL, Qwen2.5-VL, Qwen3-VL, InternVL,
LLaVA-OneVision) are built without it (`families.image_only_class`): every video processor needs
torchvision, which cannot be installed here. The saved folder still looks like the real one:
processor_config.json (image processor settings inside, as transformers 5 saves them),
tokenizer.json + tokenizer_config.json, chat_template.jinja, and a hand-written
video_preprocessor_config.json naming the video processor class.

Measured with `python tests/tiny_families.py` (2 shared CPU cores; image tokens = placeholder
tokens the processor puts in the prompt for one 64x64 image / one 96x64 image):

| family          | parameters | image tokens 64x64 | 96x64 | build s |
| --------------- | ---------- | ------------------ | ----- | ------- |
| idefics3        |    133,056 |                 20 |    20 |     0.1 |
| smolvlm2        |    133,120 |                 20 |    20 |     0.1 |
| qwen2_vl        |    153,632 |                 16 |    24 |     0.1 |
| qwen2_5_vl      |    166,240 |                 16 |    24 |     0.1 |
| qwen3_vl        |    187,552 |                 16 |    24 |     0.1 |
| internvl        |    136,544 |                 20 |    20 |     0.1 |
| gemma3          |    125,088 |                  4 |     4 |     0.1 |
| llava_next      |    188,544 |                 24 |    14 |     0.2 |
| llava_onevision |    147,072 |                 24 |    14 |     0.1 |

(The first build of a process also pays ~3 s of imports.) Image-token knobs, tiny value -> real:
Idefics3/SmolVLM `size.longest_edge` (64; real 2048 / 1536) with 32 px tiles (`max_image_size`);
Qwen `size.longest_edge` = max_pixels (128*128; real 12845056 / 16777216); InternVL
`max_patches` (4; real 12) with crop_to_patches (InternVLProcessor default on); LLaVA-NeXT /
OneVision `image_grid_pinpoints` (crops of 32 px; real 336 / 384 px); Gemma 3 none (fixed
`mm_tokens_per_image`, pan & scan off).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import toy  # noqa: E402
from families import image_only_class  # noqa: E402

# ---------------------------------------------------------------------------------------------
# Real chat templates, verbatim (a chat template is a config fact of the checkpoint, not code)
# ---------------------------------------------------------------------------------------------
# HuggingFaceTB/SmolVLM-256M-Instruct / SmolVLM-500M-Instruct (Idefics3 architecture).
# Source: transformers tests/models/idefics3 + smolvlm processor tests; a SmolVLM port that
# hex-verified the shipped template (403 chars). Starts with a literal <|im_start|> (the BOS),
# "Assistant:" has no trailing space or newline.
SMOLVLM_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% endif %}{% endfor %}<end_of_utterance>\n{% endfor %}"
    "{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# HuggingFaceTB/SmolVLM2-256M/500M-Video-Instruct: the video-aware SmolVLM template. Source:
# transformers models/smolvlm/processing_smolvlm.py DEFAULT_CHAT_TEMPLATE (the template the
# SmolVLM2 checkpoints ship; transformers falls back to it when a checkpoint's lacks <video>).
SMOLVLM2_TEMPLATE = (
    "<|im_start|>{% for message in messages %}{{message['role'] | capitalize}}"
    "{% if message['content'][0]['type'] == 'image' %}{{':'}}{% else %}{{': '}}{% endif %}"
    "{% for line in message['content'] %}{% if line['type'] == 'text' %}{{line['text']}}"
    "{% elif line['type'] == 'image' %}{{ '<image>' }}{% elif line['type'] == 'video' %}{{ '<video>' }}{% endif %}"
    "{% endfor %}<end_of_utterance>\n{% endfor %}{% if add_generation_prompt %}{{ 'Assistant:' }}{% endif %}"
)

# Qwen/Qwen2-VL-2B-Instruct chat_template.json (Qwen2.5-VL-3B-Instruct ships the same one).
# Source: the qwen2-vl-instruct entry of a transformers-compatible template table and several
# repos quoting chat_template.json. Injects a default system turn when none is given.
QWEN2_VL_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture {{ image_count.value }}: "
    "{% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video {{ video_count.value }}: "
    "{% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content %}{{ content['text'] }}{% endif %}"
    "{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
QWEN2_5_VL_TEMPLATE = QWEN2_VL_TEMPLATE

# Qwen/Qwen3-VL-2B-Instruct (all Qwen3-VL *Instruct* sizes ship this template). Source: a test
# suite that pins the Qwen3-VL-8B-Instruct template (5292 bytes, SHA-256 3636d0f0...a489e4; checked
# by tests/test_families_load.py). No <think> is injected (the *Thinking* checkpoints add
# '<think>\n' after the generation prompt and strip reasoning from earlier assistant turns).
# Two lines too long for the linter are split into adjacent raw literals; the value is unchanged (its
# SHA-256 below is checked).
QWEN3_VL_TEMPLATE = (r"""{%- if tools %}
    {{- '<|im_start|>system\n' }}
    {%- if messages[0].role == 'system' %}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n\n' }}
    {%- endif %}
    {{- "# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"""
    r"""You are provided with function signatures within <tools></tools> XML tags:\n<tools>" }}
    {%- for tool in tools %}
        {{- "\n" }}
        {{- tool | tojson }}
    {%- endfor %}
    {{- "\n</tools>\n\nFor each function call, return a json object with function name and arguments within """
    r"""<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, """
    r"""\"arguments\": <args-json-object>}\n</tool_call><|im_end|>\n" }}
{%- else %}
    {%- if messages[0].role == 'system' %}
        {{- '<|im_start|>system\n' }}
        {%- if messages[0].content is string %}
            {{- messages[0].content }}
        {%- else %}
            {%- for content in messages[0].content %}
                {%- if 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- endif %}
{%- endif %}
{%- set image_count = namespace(value=0) %}
{%- set video_count = namespace(value=0) %}
{%- for message in messages %}
    {%- if message.role == "user" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "assistant" %}
        {{- '<|im_start|>' + message.role + '\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content_item in message.content %}
                {%- if 'text' in content_item %}
                    {{- content_item.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {%- if message.tool_calls %}
            {%- for tool_call in message.tool_calls %}
                {%- if (loop.first and message.content) or (not loop.first) %}
                    {{- '\n' }}
                {%- endif %}
                {%- if tool_call.function %}
                    {%- set tool_call = tool_call.function %}
                {%- endif %}
                {{- '<tool_call>\n{"name": "' }}
                {{- tool_call.name }}
                {{- '", "arguments": ' }}
                {%- if tool_call.arguments is string %}
                    {{- tool_call.arguments }}
                {%- else %}
                    {{- tool_call.arguments | tojson }}
                {%- endif %}
                {{- '}\n</tool_call>' }}
            {%- endfor %}
        {%- endif %}
        {{- '<|im_end|>\n' }}
    {%- elif message.role == "tool" %}
        {%- if loop.first or (messages[loop.index0 - 1].role != "tool") %}
            {{- '<|im_start|>user' }}
        {%- endif %}
        {{- '\n<tool_response>\n' }}
        {%- if message.content is string %}
            {{- message.content }}
        {%- else %}
            {%- for content in message.content %}
                {%- if content.type == 'image' or 'image' in content or 'image_url' in content %}
                    {%- set image_count.value = image_count.value + 1 %}
                    {%- if add_vision_id %}Picture {{ image_count.value }}: {% endif -%}
                    <|vision_start|><|image_pad|><|vision_end|>
                {%- elif content.type == 'video' or 'video' in content %}
                    {%- set video_count.value = video_count.value + 1 %}
                    {%- if add_vision_id %}Video {{ video_count.value }}: {% endif -%}
                    <|vision_start|><|video_pad|><|vision_end|>
                {%- elif 'text' in content %}
                    {{- content.text }}
                {%- endif %}
            {%- endfor %}
        {%- endif %}
        {{- '\n</tool_response>' }}
        {%- if loop.last or (messages[loop.index0 + 1].role != "tool") %}
            {{- '<|im_end|>\n' }}
        {%- endif %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\n' }}
{%- endif %}
""")
QWEN3_VL_TEMPLATE_SHA256 = "3636d0f0bd6bef02654cdffdc447b79cb2cef8ab02cc75267345946291a489e4"

# OpenGVLab/InternVL3-1B-hf. Source: transformers models/internvl/convert_internvl_weights_to_hf.py
# (`chat_template`, the one the -hf checkpoints were written with). '<IMG_CONTEXT>\n' marks an
# image; the processor expands it to <img><IMG_CONTEXT>*(256 per tile)</img>. No default system.
INTERNVL_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{% if message['content'] is string %}"
    "{{ message['content'] }}{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' %}"
    "{{ '<IMG_CONTEXT>\n' }}{% elif content['type'] == 'video' %}{{ '<video>\n' }}{% elif content['type'] == 'text' %}"
    "{{ content['text'] }}{% endif %}{% endfor %}{% endif %}{{'<|im_end|>\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{'<|im_start|>assistant\n' }}{% endif %}"
)

# google/gemma-3-4b-it (tokenizer_config.json / chat_template.json). Source: a Rust test pinning
# "google/gemma-3-4b-it template, output checked against python transformers" (transformers'
# own gemma3 processor test carries an older copy without the string-system branch). Emits
# {{ bos_token }} itself; the assistant role is rendered as "model"; texts are trimmed.
GEMMA3_TEMPLATE = r"""{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# llava-hf/llava-v1.6-mistral-7b-hf chat_template.json (current version; the first upload wrote
# '<\\s> ' where '</s> ' is now). Source: a template table listing "llava-next old" and
# "llava-next", and a dump of the loaded processor. No generation prompt (the prompt ends with
# " [/INST]"), no BOS in the template: the Llama/Mistral tokenizer adds <s> itself. [INST] is plain
# text in Mistral-7B-Instruct-v0.2's vocabulary, not a special token.
LLAVA_NEXT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' %}"
    "{{ '<<SYS>>\n' + message['content'][0]['text'] + '\n<</SYS>>\n\n' }}{% elif message['role'] == 'user' %}"
    "{{ '[INST] ' }}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all text next #}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] }}{% endfor %}{{' [/INST]' }}{% elif message['role'] == 'assistant' %}"
    "{{ ' ' + message['content'][0]['text'] + '</s> '}}{% else %}"
    "{{ raise_exception('Only user and assistant roles are supported!') }}{% endif %}{% endfor %}"
)

# llava-hf/llava-onevision-qwen2-0.5b-ov-hf. Source: transformers
# models/llava_onevision/convert_llava_onevision_weights_to_hf.py (`chat_template`). Images are
# rendered before the text whatever their order; assistant text is wrapped in {% generation %}.
# Saved as chat_template.json it is 824 bytes, the size the hub lists for that checkpoint's file.
LLAVA_ONEVISION_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}{# Render all images first #}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{# Render all video then #}{% for content in message['content'] | selectattr('type', 'equalto', 'video') %}"
    "{{ '<video>\n' }}{% endfor %}{# Render all text next #}{% if message['role'] != 'assistant' %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] }}{% endfor %}"
    "{% else %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{% generation %}{{ content['text'] }}{% endgeneration %}{% endfor %}{% endif %}{{'<|im_end|>' + '\n'}}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# ---------------------------------------------------------------------------------------------
# Special tokens, as the real tokenizers have them (ids differ: these come first in the tiny vocab)
# ---------------------------------------------------------------------------------------------
SMOLVLM_SPECIALS = (["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<global-img>"]
                    + [f"<row_{i}_col_{j}>" for i in range(1, 7) for j in range(1, 7)]
                    + ["<fake_token_around_image>", "<image>", "<end_of_utterance>"])
SMOLVLM_ROLES = dict(bos_token="<|im_start|>", eos_token="<end_of_utterance>", pad_token="<|im_end|>",
                     unk_token="<|endoftext|>")
QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
                 "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>"]
QWEN_ROLES = dict(eos_token="<|im_end|>", pad_token="<|endoftext|>")  # Qwen has no BOS token
QWEN_LISTED = QWEN_SPECIALS[1:]  # additional_special_tokens of the Qwen2-VL / 2.5-VL / 3-VL tokenizers
SMOLVLM_LISTED = ["<fake_token_around_image>", "<image>", "<end_of_utterance>"]
INTERNVL_SPECIALS = QWEN_SPECIALS + ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>",
                                     "<box>", "</box>", "<video>"]
INTERNVL_LISTED = QWEN_LISTED + ["<img>", "</img>", "<IMG_CONTEXT>", "<quad>", "</quad>", "<ref>", "</ref>", "<box>",
                                  "</box>"]  # the -hf conversion adds these to Qwen2.5-VL's list
INTERNVL_EXTRA = {"start_image_token": "<img>", "end_image_token": "</img>", "context_image_token": "<IMG_CONTEXT>",
                  "video_token": "<video>"}
GEMMA3_SPECIALS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>", "<start_of_turn>", "<end_of_turn>", "<start_of_image>",
                   "<end_of_image>", "<image_soft_token>"]
GEMMA3_ROLES = dict(pad_token="<pad>", eos_token="<eos>", bos_token="<bos>", unk_token="<unk>", mask_token="<mask>")
GEMMA3_EXTRA = {"image_token": "<image_soft_token>", "boi_token": "<start_of_image>", "eoi_token": "<end_of_image>"}
LLAVA_NEXT_SPECIALS = ["<unk>", "<s>", "</s>", "<image>", "<pad>"]  # <image> 32000, <pad> 32001 in the real one
LLAVA_NEXT_ROLES = dict(unk_token="<unk>", bos_token="<s>", eos_token="</s>", pad_token="<pad>")
ONEVISION_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]

FAMILY_NAMES = ("idefics3", "smolvlm2", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "internvl", "gemma3", "llava_next",
                "llava_onevision")
# The video processor class each real processor_config / video_preprocessor_config.json names.
VIDEO_PROCESSOR = {"smolvlm2": "SmolVLMVideoProcessor", "qwen2_vl": "Qwen2VLVideoProcessor",
                   "qwen2_5_vl": "Qwen2VLVideoProcessor", "qwen3_vl": "Qwen3VLVideoProcessor",
                   "internvl": "InternVLVideoProcessor", "llava_onevision": "LlavaOnevisionVideoProcessor"}
HAS_VIDEO_PROCESSOR = frozenset(VIDEO_PROCESSOR)
IMAGE_TOKEN = {"idefics3": "<image>", "smolvlm2": "<image>", "qwen2_vl": "<|image_pad|>", "qwen2_5_vl": "<|image_pad|>",
               "qwen3_vl": "<|image_pad|>", "internvl": "<IMG_CONTEXT>", "gemma3": "<image_soft_token>",
               "llava_next": "<image>", "llava_onevision": "<image>"}

# Tiny sizes shared by the builders: realistic structure, a few hundred K parameters.
TEXT = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=1024)
VISION = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
TILE = 32  # px: the vision tower's input size for the tiling families
PATCH = 8


def family_tokenizer(specials: list[str], bos_first: str | None = None, listed: list[str] = (), **kwargs):
    """Tiny byte-level BPE with the family's special tokens first (SmolVLM, Qwen, InternVL and
    OneVision really use byte-level BPE); `bos_first` makes every encoding start with that token;
    `listed` are the real tokenizer's additional special tokens (in all_special_ids: skipped when
    decoding)."""
    from tokenizers import processors

    # the demo phrasing only: the families' tokenizers stay as they were before the hard toy
    corpus = toy.tokenizer_corpus(("colour",))
    tok = toy.build_tiny_tokenizer(vocab_size=640, special_tokens=specials, corpus=corpus, **kwargs)
    if listed:
        tok.add_special_tokens({"extra_special_tokens": list(listed)}, replace_extra_special_tokens=False)
    if bos_first:
        bos_id = tok.convert_tokens_to_ids(bos_first)
        tok.backend_tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos_first} $A", pair=f"{bos_first} $A {bos_first} $B", special_tokens=[(bos_first, bos_id)])
    return tok


# Config a real SentencePiece checkpoint carries that the tokenizer class does not save by itself
# (written into tokenizer_config.json after saving): llava-v1.6-mistral-7b-hf's Llama tokenizer is
# the legacy one, which puts a prefix space ("▁") before the text after every special token.
TOKENIZER_CONFIG = {"llava_next": {"legacy": True, "add_bos_token": True}, "gemma3": {"add_bos_token": True}}


def sentencepiece_tokenizer(kind: str, specials: list[str], corpus_extra: tuple[str, ...] = (), **kwargs):
    """A tiny SentencePiece-style BPE built with the real tokenizer class of the checkpoint:
    `LlamaTokenizer` (kind "llama": Llama / Mistral, e.g. llava-v1.6-mistral) or `GemmaTokenizer`
    (kind "gemma": Gemma 3). Spaces are "▁", unknown bytes fall back to <0x00>..<0xFF> (ids
    right after the specials, as in the real vocabularies), and the class sets the real
    pre-tokenizer, prefix-space rule and decoder, so the boundary effects of these tokenizers (a
    prefix space on text tokenised alone, "▁" merged into the next word) are those of the
    real ones. Merges are learned on words split at spaces, as SentencePiece learns them, so no
    token spans two words. <think>/<answer> stay plain text: the real vocabularies lack them."""
    import json

    from tokenizers import AddedToken, Tokenizer, models, normalizers, pre_tokenizers, trainers
    from transformers import GemmaTokenizer, LlamaTokenizer

    corpus = toy.tokenizer_corpus(("colour",)) + list(corpus_extra) * 4
    trainer_tok = Tokenizer(models.BPE(unk_token=kwargs.get("unk_token"), byte_fallback=True))
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(
        replacement="▁", prepend_scheme="always" if kind == "llama" else "never", split=True)
    trainer = trainers.BpeTrainer(vocab_size=640, special_tokens=specials, show_progress=False)
    trainer_tok.train_from_iterator(corpus, trainer)
    learned = json.loads(trainer_tok.to_str())["model"]
    pieces = [t for t, _ in sorted(learned["vocab"].items(), key=lambda kv: kv[1]) if t not in specials]
    vocab = {t: i for i, t in enumerate([*specials, *(f"<0x{b:02X}>" for b in range(256)), *pieces])}
    merges = [tuple(m) if isinstance(m, list) else tuple(m.split(" ")) for m in learned["merges"]]
    cls = LlamaTokenizer if kind == "llama" else GemmaTokenizer
    settings = TOKENIZER_CONFIG["llava_next" if kind == "llama" else "gemma3"]
    tok = cls(vocab=vocab, merges=merges, padding_side="left", **settings, **kwargs)
    if kind == "llama":
        # llava-v1.6-mistral-7b-hf's tokenizer.json is the legacy Llama layout, which transformers loads as
        # written: a normalizer that prepends "▁" to every piece of text between special tokens (also to
        # one that already starts with a space) and no pre-tokenizer.
        tok.backend_tokenizer.normalizer = normalizers.Sequence([normalizers.Prepend("▁"),
                                                                 normalizers.Replace(" ", "▁")])
        tok.backend_tokenizer.pre_tokenizer = None
    tok.add_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    return tok


def token_ids(tok, *names, **roles) -> dict:
    out = {f"{k}_token_id": tok.convert_tokens_to_ids(v) for k, v in roles.items()}
    return out | {n: tok.convert_tokens_to_ids(t) for n, t in names}


# ---------------------------------------------------------------------------------------------
# Builders: each returns (model, processor, generation ids)
# ---------------------------------------------------------------------------------------------
def _llama_text(tok, **extra) -> dict:
    return dict(model_type="llama", vocab_size=len(tok), tie_word_embeddings=True, **TEXT, **extra)


def build_idefics3():
    """SmolVLM-256M/500M-Instruct: Idefics3 with image splitting into 512 px tiles + a global view,
    64 tokens per tile (patch 16, scale_factor 4). Tiny: 32 px tiles, patch 8, scale 2 -> 4 tokens."""
    from transformers import Idefics3Config, Idefics3ForConditionalGeneration, Idefics3Processor
    from transformers.models.idefics3.image_processing_pil_idefics3 import Idefics3ImageProcessorPil

    tok = family_tokenizer(SMOLVLM_SPECIALS, listed=SMOLVLM_LISTED, **SMOLVLM_ROLES)
    image_processor = Idefics3ImageProcessorPil(do_image_splitting=True, size={"longest_edge": 2 * TILE},
                                                max_image_size={"longest_edge": TILE})
    processor = Idefics3Processor(image_processor=image_processor, tokenizer=tok,
                                  image_seq_len=(TILE // PATCH) ** 2 // 4, chat_template=SMOLVLM_TEMPLATE)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = Idefics3Config(text_config=_llama_text(tok, **ids), scale_factor=2,
                            image_token_id=processor.image_token_id,
                            vision_config=dict(**VISION, image_size=TILE, patch_size=PATCH), tie_word_embeddings=True)
    # SmolVLM generation_config: eos <end_of_utterance>, pad <|im_end|>
    return Idefics3ForConditionalGeneration(config), processor, ids


def build_smolvlm2():
    """SmolVLM2-256M/500M-Video-Instruct: the SmolVLM architecture class, same image path as Idefics3."""
    from transformers import SmolVLMConfig, SmolVLMForConditionalGeneration, SmolVLMProcessor
    from transformers.models.smolvlm.image_processing_pil_smolvlm import SmolVLMImageProcessorPil

    tok = family_tokenizer(SMOLVLM_SPECIALS + ["<video>"], listed=SMOLVLM_LISTED, **SMOLVLM_ROLES)
    image_processor = SmolVLMImageProcessorPil(do_image_splitting=True, size={"longest_edge": 2 * TILE},
                                               max_image_size={"longest_edge": TILE})
    processor = image_only_class(SmolVLMProcessor)(image_processor=image_processor, tokenizer=tok,
                                 image_seq_len=(TILE // PATCH) ** 2 // 4, chat_template=SMOLVLM2_TEMPLATE)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = SmolVLMConfig(text_config=_llama_text(tok, **ids), scale_factor=2, image_token_id=processor.image_token_id,
                           vision_config=dict(**VISION, image_size=TILE, patch_size=PATCH), tie_word_embeddings=True)
    return SmolVLMForConditionalGeneration(config), processor, ids


def _qwen_image_processor(**kwargs):
    """Qwen2-VL's PIL image processor: resize to multiples of patch*merge within [min, max] pixels
    (size = {"shortest_edge": min_pixels, "longest_edge": max_pixels}), flatten patches."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    return Qwen2VLImageProcessorPil(patch_size=PATCH, merge_size=2, temporal_patch_size=2,
                                    size={"shortest_edge": 16 * 16 * 4, "longest_edge": 128 * 128}, **kwargs)


def _qwen_ids(tok) -> dict:
    # Qwen2/2.5/3-VL generation_config: eos [<|im_end|>, <|endoftext|>], pad/bos <|endoftext|>
    end = tok.convert_tokens_to_ids("<|endoftext|>")
    return dict(bos_token_id=end, eos_token_id=[tok.eos_token_id, end], pad_token_id=tok.pad_token_id)


def _qwen_vision_ids(tok) -> dict:
    return token_ids(tok, ("image_token_id", "<|image_pad|>"), ("video_token_id", "<|video_pad|>"),
                     ("vision_start_token_id", "<|vision_start|>"), ("vision_end_token_id", "<|vision_end|>"))


def _qwen_text(tok, mrope_section, **extra) -> dict:
    # head_dim 16 -> mrope_section sums to 8 (real: head_dim 128, [16, 24, 24] / [24, 20, 20])
    rope = {"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": mrope_section, **extra}
    return dict(vocab_size=len(tok), tie_word_embeddings=True, rope_parameters=rope, **TEXT,
                bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)


def build_qwen2_vl():
    """Qwen2-VL-2B-Instruct: patch 14, merge 2, M-RoPE. Tiny: patch 8 -> a 64x64 image is 8x8 patches
    -> 16 tokens."""
    from transformers import Qwen2VLConfig, Qwen2VLForConditionalGeneration, Qwen2VLProcessor

    tok = family_tokenizer(QWEN_SPECIALS, listed=QWEN_LISTED, **QWEN_ROLES)
    processor = image_only_class(Qwen2VLProcessor)(image_processor=_qwen_image_processor(), tokenizer=tok,
                                 chat_template=QWEN2_VL_TEMPLATE)
    config = Qwen2VLConfig(text_config=_qwen_text(tok, [2, 3, 3]), **_qwen_vision_ids(tok), tie_word_embeddings=True,
                           vision_config=dict(depth=1, embed_dim=32, hidden_size=TEXT["hidden_size"], num_heads=2,
                                              mlp_ratio=2, patch_size=PATCH, spatial_merge_size=2,
                                              temporal_patch_size=2))
    return Qwen2VLForConditionalGeneration(config), processor, _qwen_ids(tok)


def build_qwen2_5_vl():
    """Qwen2.5-VL-3B-Instruct: windowed vision attention (window 112 px) with full-attention blocks.
    Tiny: 2 blocks, block 1 full, window 32 px = 2x2 merged units."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2_5_VLProcessor

    tok = family_tokenizer(QWEN_SPECIALS, listed=QWEN_LISTED, **QWEN_ROLES)
    processor = image_only_class(Qwen2_5_VLProcessor)(image_processor=_qwen_image_processor(), tokenizer=tok,
                                    chat_template=QWEN2_5_VL_TEMPLATE)
    config = Qwen2_5_VLConfig(text_config=_qwen_text(tok, [2, 3, 3]), **_qwen_vision_ids(tok), tie_word_embeddings=True,
                              vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                                 out_hidden_size=TEXT["hidden_size"], patch_size=PATCH,
                                                 window_size=4 * PATCH, fullatt_block_indexes=[1],
                                                 spatial_merge_size=2, temporal_patch_size=2))
    return Qwen2_5_VLForConditionalGeneration(config), processor, _qwen_ids(tok)


def build_qwen3_vl():
    """Qwen3-VL-2B-Instruct: patch 16, learned position embeddings (interpolated), DeepStack
    features from intermediate vision layers, interleaved M-RoPE. Tiny: patch 8, 4x4 position grid."""
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration, Qwen3VLProcessor

    tok = family_tokenizer(QWEN_SPECIALS, listed=QWEN_LISTED, **QWEN_ROLES)
    image_processor = _qwen_image_processor(image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = image_only_class(Qwen3VLProcessor)(image_processor=image_processor, tokenizer=tok,
                                                   chat_template=QWEN3_VL_TEMPLATE)
    head_dim = TEXT["hidden_size"] // TEXT["num_attention_heads"]
    text = _qwen_text(tok, [4, 2, 2], mrope_interleaved=True) | dict(head_dim=head_dim)
    config = Qwen3VLConfig(text_config=text, **_qwen_vision_ids(tok), tie_word_embeddings=True,
                           vision_config=dict(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                              out_hidden_size=TEXT["hidden_size"], patch_size=PATCH,
                                              num_position_embeddings=16, deepstack_visual_indexes=[0],
                                              spatial_merge_size=2, temporal_patch_size=2))
    return Qwen3VLForConditionalGeneration(config), processor, _qwen_ids(tok)


def build_internvl():
    """InternVL3-1B-hf: InternViT 448 px tiles (patch 14), pixel shuffle 0.5 -> 256 tokens per tile,
    dynamic tiling into up to 12 tiles + a thumbnail (GotOcr2 image processor, crop_to_patches).
    Tiny: 32 px tiles, patch 8, pixel shuffle -> 4 tokens per tile, at most 4 tiles + thumbnail."""
    from transformers import InternVLConfig, InternVLForConditionalGeneration, InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    tok = family_tokenizer(INTERNVL_SPECIALS, listed=INTERNVL_LISTED, extra_special_tokens=INTERNVL_EXTRA, **QWEN_ROLES)
    image_processor = GotOcr2ImageProcessorPil(size={"height": TILE, "width": TILE}, crop_to_patches=False,
                                               min_patches=1, max_patches=4)
    processor = image_only_class(InternVLProcessor)(image_processor=image_processor, tokenizer=tok,
                                  image_seq_length=(TILE // PATCH) ** 2 // 4, chat_template=INTERNVL_TEMPLATE)
    text = dict(model_type="qwen2", vocab_size=len(tok), **TEXT, tie_word_embeddings=True,
                bos_token_id=tok.convert_tokens_to_ids("<|endoftext|>"), eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id)
    config = InternVLConfig(text_config=text, image_token_id=processor.image_token_id, downsample_ratio=0.5,
                            image_seq_length=processor.image_seq_length, tie_word_embeddings=True,
                            vision_config=dict(**VISION, image_size=[TILE, TILE], patch_size=[PATCH, PATCH]))
    # InternVL3-hf: eos <|im_end|> only (the conversion forces 151645)
    ids = dict(bos_token_id=text["bos_token_id"], eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return InternVLForConditionalGeneration(config), processor, ids


def build_gemma3():
    """gemma-3-4b-it: SigLIP 896 px (patch 14) -> 64x64 patches avg-pooled to 16x16 = 256 tokens
    (mm_tokens_per_image). Every image is resized to the fixed square (no tiling without pan&scan).
    Tiny: 32 px, patch 8 -> 4x4 patches pooled to 2x2 = 4 tokens."""
    from transformers import Gemma3Config, Gemma3ForConditionalGeneration, Gemma3Processor
    from transformers.models.gemma3.image_processing_pil_gemma3 import Gemma3ImageProcessorPil

    tok = sentencepiece_tokenizer("gemma", GEMMA3_SPECIALS, ("user", "model"), extra_special_tokens=GEMMA3_EXTRA,
                                  **GEMMA3_ROLES)
    image_processor = Gemma3ImageProcessorPil(size={"height": TILE, "width": TILE}, do_pan_and_scan=False)
    processor = Gemma3Processor(image_processor=image_processor, tokenizer=tok, image_seq_length=4,
                                chat_template=GEMMA3_TEMPLATE)
    ids = dict(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    text = dict(vocab_size=len(tok), **TEXT, head_dim=16, query_pre_attn_scalar=16, sliding_window=64,
                layer_types=["sliding_attention", "full_attention"], **ids)
    image_ids = token_ids(tok, ("boi_token_index", "<start_of_image>"), ("eoi_token_index", "<end_of_image>"),
                          ("image_token_index", "<image_soft_token>"))
    config = Gemma3Config(text_config=text, mm_tokens_per_image=4,
                          vision_config=dict(**VISION, image_size=TILE, patch_size=PATCH, vision_use_head=False),
                          **image_ids)
    # gemma-3-4b-it generation_config: eos [<eos>, <end_of_turn>], pad <pad>, bos <bos>
    gen = dict(ids, eos_token_id=[tok.eos_token_id, tok.convert_tokens_to_ids("<end_of_turn>")])
    return Gemma3ForConditionalGeneration(config), processor, gen


def build_llava_next():
    """llava-v1.6-mistral-7b-hf: CLIP 336 px (patch 14), features of the second-to-last layer minus
    CLS ("default"), anyres: a base view + the best pinpoint grid of 336 px crops, unpadded, with an
    image_newline per row. Tiny: CLIP 32 px patch 16 (2x2 features per crop), pinpoints up to 64 px."""
    from transformers import LlavaNextConfig, LlavaNextForConditionalGeneration, LlavaNextProcessor
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    tok = sentencepiece_tokenizer("llama", LLAVA_NEXT_SPECIALS, ("[INST] Which emotion? [/INST]",),
                                  extra_special_tokens={"image_token": "<image>"}, **LLAVA_NEXT_ROLES)
    pinpoints = [[TILE, 2 * TILE], [2 * TILE, TILE], [2 * TILE, 2 * TILE]]
    image_processor = LlavaNextImageProcessorPil(size={"shortest_edge": TILE},
                                                 crop_size={"height": TILE, "width": TILE},
                                                 image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tok, patch_size=16,
                                   vision_feature_select_strategy="default", num_additional_image_tokens=1,
                                   chat_template=LLAVA_NEXT_TEMPLATE)
    ids = dict(bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    text = dict(model_type="mistral", vocab_size=len(tok), **TEXT, sliding_window=None, **ids)
    config = LlavaNextConfig(text_config=text, image_token_index=processor.image_token_id,
                             image_grid_pinpoints=pinpoints,
                             vision_feature_layer=-2, vision_feature_select_strategy="default",
                             vision_config=dict(model_type="clip_vision_model", **(VISION | dict(num_hidden_layers=2)),
                                                image_size=TILE, patch_size=16, projection_dim=32),
                             image_seq_length=(TILE // 16) ** 2, pad_token_id=tok.pad_token_id)
    return LlavaNextForConditionalGeneration(config), processor, ids


def build_llava_onevision():
    """llava-onevision-qwen2-0.5b-ov-hf: SigLIP 384 px (patch 14, 729 tokens per crop, all kept:
    "full"), anyres_max_9 over pinpoints of 384 px crops. Tiny: SigLIP 32 px patch 16 (4 tokens)."""
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration, LlavaOnevisionProcessor
    from transformers.models.llava_onevision.image_processing_pil_llava_onevision import LlavaOnevisionImageProcessorPil

    tok = family_tokenizer(ONEVISION_SPECIALS, listed=["<|im_start|>", "<|im_end|>"],
                           extra_special_tokens={"image_token": "<image>", "video_token": "<video>"}, **QWEN_ROLES)
    pinpoints = [[TILE * i, TILE * j] for i in (1, 2) for j in (1, 2)]
    image_processor = LlavaOnevisionImageProcessorPil(size={"height": TILE, "width": TILE},
                                                      image_grid_pinpoints=pinpoints)
    processor = image_only_class(LlavaOnevisionProcessor)(image_processor=image_processor, tokenizer=tok,
                                        num_image_tokens=(TILE // 16) ** 2, vision_feature_select_strategy="full",
                                        vision_aspect_ratio="anyres_max_9", chat_template=LLAVA_ONEVISION_TEMPLATE)
    bos = tok.convert_tokens_to_ids("<|endoftext|>")
    text = dict(model_type="qwen2", vocab_size=len(tok), **TEXT, tie_word_embeddings=True, bos_token_id=bos,
                eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    config = LlavaOnevisionConfig(text_config=text, image_grid_pinpoints=pinpoints, vision_feature_layer=-1,
                                  vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
                                  vision_config=dict(model_type="siglip_vision_model", **VISION, image_size=TILE,
                                                     patch_size=16, vision_use_head=False),
                                  **token_ids(tok, ("image_token_index", "<image>"), ("video_token_index", "<video>")))
    # generation_config: bos <|endoftext|>, eos <|im_end|>
    ids = dict(bos_token_id=bos, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    return LlavaOnevisionForConditionalGeneration(config), processor, ids


BUILDERS = {name: globals()[f"build_{name}"] for name in FAMILY_NAMES}


def build_tiny_family(name: str, out: str | Path, seed: int = 0) -> Path:
    """Build, randomly initialise and save one family's tiny checkpoint into `out`; returns `out`."""
    import torch

    if name not in BUILDERS:
        raise ValueError(f"unknown family {name!r}; known: {', '.join(FAMILY_NAMES)}")
    torch.manual_seed(seed)
    model, processor, ids = BUILDERS[name]()
    randomise_zero_weights(model)
    model.generation_config.update(**ids)
    out = Path(out)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    if name in TOKENIZER_CONFIG:
        config_file = out / "tokenizer_config.json"
        config_file.write_text(json.dumps({**json.loads(config_file.read_text()), **TOKENIZER_CONFIG[name]}, indent=2))
    if name in VIDEO_PROCESSOR:
        # Written by hand (the class cannot be built without torchvision), as the real folders
        # carry one: AutoProcessor then fails the way it does on a real checkpoint.
        video_config = {"video_processor_type": VIDEO_PROCESSOR[name], "processor_class": type(processor).__name__}
        (out / "video_preprocessor_config.json").write_text(json.dumps(video_config, indent=2) + "\n")
    return out


def randomise_zero_weights(model) -> None:
    """Some families initialise a projection to zeros (Gemma 3's mm_input_projection_weight):
    trained checkpoints never have that, and with it the image would not reach the text model
    at all, so a test could not tell one image from another. Give such matrices random values."""
    import torch

    with torch.no_grad():
        for param in model.parameters():
            if param.dim() >= 2 and not param.any():
                param.normal_(0.0, 0.05)


def _image_tokens(processor, name: str, width: int, height: int = 64) -> int:
    from PIL import Image

    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "hi"}]}]
    prompt = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    inputs = processor(images=[[Image.new("RGB", (width, height), (90, 140, 200))]], text=[prompt], return_tensors="pt")
    return int((inputs["input_ids"] == processor.tokenizer.convert_tokens_to_ids(IMAGE_TOKEN[name])).sum())


def main(argv=None) -> None:
    """Build every family into a temporary folder and print the docstring table rows."""
    import tempfile

    import torch

    sys.path.insert(0, str(ROOT))
    import families

    torch.set_num_threads(2)
    names = argv or list(FAMILY_NAMES)
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            t0 = time.perf_counter()
            path = build_tiny_family(name, Path(tmp) / name)
            seconds = time.perf_counter() - t0
            model, processor = families.load_model(path)
            n_params = sum(p.numel() for p in model.parameters())
            print(f"| {name:<15} | {n_params:>10,} | {_image_tokens(processor, name, 64):>18} | "
                  f"{_image_tokens(processor, name, 96):>5} | {seconds:>7.1f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
