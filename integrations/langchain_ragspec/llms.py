"""RagSpecLLM: string completion through ragspec, as a LangChain LLM."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseLLM
from langchain_core.outputs import Generation, GenerationChunk, LLMResult

from langchain_ragspec._base import RagSpecParams
from langchain_ragspec._convert import final_metadata, piece_metadata, usage
from langchain_ragspec._engines import Outcome


class RagSpecLLM(RagSpecParams, BaseLLM):
    """Complete raw text (no chat template) with ragspec; the same settings, metrics and
    documents=/index retrieval as ChatRagSpec. `generation_info` carries `token_ids`,
    `token_sources`, `usage`, `model_name`, `finish_reason` and `speculation`."""

    @property
    def _llm_type(self) -> str:
        return "ragspec"

    def _generate(self, prompts: list[str], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> LLMResult:
        generations = []
        for prompt in prompts:
            outcome = Outcome()
            pieces = list(self.run_pieces(prompt, stop, kwargs, outcome))
            generations.append([self._generation(pieces, outcome, kwargs)])
        return LLMResult(generations=generations, llm_output={"model_name": self.model_name_for(kwargs.get("model"))})

    async def _agenerate(self, prompts: list[str], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> LLMResult:
        generations = []
        for prompt in prompts:
            outcome = Outcome()
            async with aclosing(self.run_pieces_async(prompt, stop, kwargs, outcome)) as stream:
                pieces = [p async for p in stream]
            generations.append([self._generation(pieces, outcome, kwargs)])
        return LLMResult(generations=generations, llm_output={"model_name": self.model_name_for(kwargs.get("model"))})

    def _generation(self, pieces, outcome: Outcome, kwargs: dict) -> Generation:
        result = outcome.result
        info = {**self._final_info(outcome, kwargs), "token_ids": list(result.token_ids),
                "token_sources": [s for p in pieces for s in p.sources]}
        return Generation(text=result.text, generation_info=info)

    def _final_info(self, outcome: Outcome, kwargs: dict) -> dict:
        result = outcome.result
        return {**final_metadata(self.model_name_for(kwargs.get("model")), result), "usage": usage(result)}

    def _stream(self, prompt: str, stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[GenerationChunk]:
        outcome = Outcome()
        for piece in self.run_pieces(prompt, stop, kwargs, outcome):
            chunk = GenerationChunk(text=piece.text, generation_info=piece_metadata(piece))
            if run_manager:
                run_manager.on_llm_new_token(piece.text, chunk=chunk)
            yield chunk
        yield GenerationChunk(text="", generation_info=self._final_info(outcome, kwargs))

    async def _astream(self, prompt: str, stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[GenerationChunk]:
        outcome = Outcome()
        async with aclosing(self.run_pieces_async(prompt, stop, kwargs, outcome)) as stream:
            async for piece in stream:
                chunk = GenerationChunk(text=piece.text, generation_info=piece_metadata(piece))
                if run_manager:
                    await run_manager.on_llm_new_token(piece.text, chunk=chunk)
                yield chunk
        yield GenerationChunk(text="", generation_info=self._final_info(outcome, kwargs))
