"""Our GPT as an lm-evaluation-harness model: `lm_eval.api.model.TemplateLM`, registered as "nanochat-lightning".

Why a registered LM over our GPT rather than lm-eval's HF backend on an export: it needs no transformers
at evaluation time and no export step, it scores with the very model and tokenizer llm.eval loads (same
device, precision and ranks), and the numbers are comparable with lm-eval's HF backend on the export,
which tokenizes the same way (llm.huggingface's tokenizer.json prepends <|bos|> like we do here).

How requests become tokens, as lm-eval's HF backend does it (TemplateLM._encode_pair):
- every text is encoded with our Tokenizer after a <|bos|> (what every training document started with);
- loglikelihood(context, continuation): trailing spaces of the context move to the continuation; the
  whole text and the context are encoded, and the continuation is the whole text's tokens past the
  context's (a merge across the boundary counts as the continuation's); an empty context is <|bos|>
  alone. The score is the sum of the log-probabilities of the continuation tokens, each given all
  tokens before it, and is_greedy says whether each was the argmax. Inputs longer than the context
  window keep their last sequence_len tokens;
- loglikelihood_rolling(text): disjoint windows of sequence_len tokens, each predicted once, <|bos|> first
  (lm-eval's HF backend on an export scores one <|bos|> more: its tokenizer adds one, lm-eval another);
- generate_until(context, {until, max_gen_toks, temperature, do_sample}): our Generator without the
  calculator tool, greedy unless sampling is asked for, cut at the first `until` string.

Rows are scored longest first in batches of batch_size, right-padded with <|bos|> (a causal model
never looks at what follows). Under several processes lm-eval gives each rank its share of the
documents; the collectives below are torch.distributed's (the process group Fabric set up).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
import lm_eval.models  # noqa: F401  (lm-eval fills its model registry lazily only while it is empty: fill it first,
from lm_eval import utils  # or registering ours below would hide "hf", "local-completions", ... in this process)
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from tqdm import tqdm

from llm.generate.engine import Generator
from llm.generate.sampling import Sampling
from llm.generate.text_stream import completion_text
from llm.model.gpt import GPT
from llm.tokenizer import Tokenizer

MODEL_NAME = "nanochat-lightning"
DEFAULT_MAX_GEN_TOKS = 256  # lm-eval's own default for generate_until


@register_model(MODEL_NAME)
class NanochatLM(TemplateLM):
    def __init__(self, model: GPT, tokenizer: Tokenizer, batch_size: int = 8, rank: int = 0, world_size: int = 1,
                 device: str | None = None, progress: bool = True):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size={batch_size} must be >= 1")
        self.model, self.tokenizer, self.batch_size, self.progress = model.eval(), tokenizer, batch_size, progress
        self._rank, self._world_size = rank, world_size
        self._device = device or str(next(model.parameters()).device)
        self.context = int(model.config.sequence_len)

    @classmethod
    def create_from_arg_string(cls, arg_string: str, additional_config: dict | None = None) -> "NanochatLM":
        """`model_args="source=<artifact folder>[,batch_size=N,device=cuda]"` from lm-eval's own entry points."""
        return cls.create_from_arg_obj(utils.simple_parse_args_string(arg_string), additional_config)

    @classmethod
    def create_from_arg_obj(cls, arg_dict: dict, additional_config: dict | None = None) -> "NanochatLM":
        from llm.artifact import load_artifact

        args = {**{k: v for k, v in (additional_config or {}).items() if v is not None}, **arg_dict}
        if "source" not in args:
            raise ValueError(f"{MODEL_NAME} needs model_args source=<artifact folder>, got {sorted(args)}")
        device = args.get("device") or ("cuda" if torch.cuda.is_available() else "cpu")
        model, tokenizer, _ = load_artifact(Path(args["source"]), device=device)
        batch_size = args.get("batch_size") or 8
        if not str(batch_size).isdigit():
            raise ValueError(f"batch_size={batch_size!r}: {MODEL_NAME} takes an integer batch size (not 'auto')")
        return cls(model, tokenizer, batch_size=int(batch_size), device=device)

    # ------------------------------------------------------------------------- tokens

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.bos_id  # a document ends where the next one's <|bos|> would start

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id

    @property
    def tokenizer_name(self) -> str:
        return f"{MODEL_NAME}-{self.tokenizer.fingerprint()[:12]}"

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        return self.tokenizer.encode(string, prepend_bos=add_special_tokens is not False)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self.tokenizer.decode(tokens)

    # ------------------------------------------------------------------------- scoring

    def _row(self, context: list[int], continuation: list[int]) -> tuple[list[int], list[int]]:
        """(model input, scored targets): the last `context` positions of context + continuation."""
        tokens = [*context, *continuation]
        inputs, targets = tokens[:-1][-self.context:], tokens[1:][-self.context:]
        return inputs, targets[-len(continuation):] if continuation else []

    @torch.no_grad()
    def _score(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        width = max(len(inputs) for inputs, _ in rows)
        ids = torch.full((len(rows), width), self.tokenizer.bos_id, dtype=torch.long)
        for i, (inputs, _) in enumerate(rows):
            ids[i, :len(inputs)] = torch.tensor(inputs)
        logits = self.model(ids.to(self._device))
        scores = []
        for i, (inputs, targets) in enumerate(rows):
            span = logits[i, len(inputs) - len(targets):len(inputs)].float()
            target = torch.tensor(targets, device=span.device)
            logprobs = F.log_softmax(span, dim=-1).gather(-1, target[:, None]).squeeze(-1)
            scores.append((float(logprobs.double().sum()), bool((span.argmax(-1) == target).all())))
        return scores

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        rows = [self._row(context, continuation) for _, context, continuation in requests]
        order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))  # similar lengths share a batch
        results: list[tuple[float, bool] | None] = [None] * len(rows)
        batches = range(0, len(order), self.batch_size)
        for start in tqdm(batches, desc="lm-eval loglikelihood", disable=disable_tqdm or not self._shows_progress):
            batch = order[start:start + self.batch_size]
            for i, score in zip(batch, self._score([rows[i] for i in batch])):
                results[i] = score
                if requests[i][0] is not None:
                    self.cache_hook.add_partial("loglikelihood", requests[i][0], score)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        out = []
        for (text,) in tqdm([r.args for r in requests], desc="lm-eval rolling", disable=not self._shows_progress):
            windows = utils.get_rolling_token_windows(token_list=self.tok_encode(text, add_special_tokens=False),
                                                      prefix_token=self.prefix_token_id,
                                                      max_seq_len=self.context, context_len=1)
            pieces = [(None, *utils.make_disjoint_window(w)) for w in windows]
            total = sum(score for score, _ in self._loglikelihood_tokens(pieces, disable_tqdm=True))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            out.append(total)
        return out

    # ------------------------------------------------------------------------- generation

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        """Requests with the same generation settings decode together, batch_size rows at a time."""
        generator = Generator(self.model, self.tokenizer, tool=None, max_rows=self.batch_size)
        groups: dict[str, list[int]] = {}
        for i, r in enumerate(requests):
            groups.setdefault(json.dumps(r.args[1], sort_keys=True, default=str), []).append(i)
        out: list[str | None] = [None] * len(requests)
        for key, members in tqdm(groups.items(), desc="lm-eval generate", disable=not self._shows_progress):
            sampling, until = self._sampling(json.loads(key))
            prompts = [self.tok_encode(requests[i].args[0])[-(self.context - sampling.max_tokens):] for i in members]
            for i, (tokens, _) in zip(members, generator.generate_batch(prompts, sampling)):
                text = completion_text(self.tokenizer, tokens)
                for stop in until:
                    text = text.split(stop)[0]
                out[i] = text
                self.cache_hook.add_partial("generate_until", requests[i].args, text)
        return out

    def _sampling(self, gen_kwargs: dict) -> tuple[Sampling, list[str]]:
        until = gen_kwargs.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        max_tokens = min(int(gen_kwargs.get("max_gen_toks", DEFAULT_MAX_GEN_TOKS)), self.context - 1)
        # as transformers' generate: do_sample picks sampling (at temperature, 1.0 if unset); without it, greedy
        sample = gen_kwargs.get("do_sample", float(gen_kwargs.get("temperature", 0.0)) > 0)
        temperature = float(gen_kwargs.get("temperature", 1.0)) if sample else 0.0
        top_k = gen_kwargs.get("top_k")
        return Sampling(max_tokens=max_tokens, temperature=temperature, top_k=int(top_k) if top_k else None,
                        stop=tuple(u for u in until if u)), until

    # ------------------------------------------------------------------------- ranks

    @property
    def device(self) -> str:  # where lm-eval puts the per-rank request counts it gathers
        return self._device

    @property
    def _shows_progress(self) -> bool:
        return self.progress and self._rank == 0

    def all_gather(self, tensor: torch.Tensor) -> torch.Tensor:
        if self._world_size == 1:
            return tensor
        parts = [torch.zeros_like(tensor) for _ in range(self._world_size)]
        dist.all_gather(parts, tensor)
        return torch.stack(parts) if tensor.dim() == 0 else torch.cat(parts)

    def gather_object(self, obj, dst: int = 0):
        if self._world_size == 1:
            return [obj]
        out = [None] * self._world_size if self._rank == dst else None
        dist.gather_object(obj, out, dst=dst)
        return out

    def barrier(self) -> None:
        if self._world_size > 1:
            dist.barrier()
