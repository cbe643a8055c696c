"""ChatRagSpec: a LangChain chat model over ragspec's lossless speculative decoding."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import aclosing
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableLambda

from langchain_ragspec._base import RagSpecParams
from langchain_ragspec._convert import final_metadata, message_text, piece_metadata, to_chat_messages, usage
from langchain_ragspec._engines import Outcome


class ChatRagSpec(RagSpecParams, BaseChatModel):
    """Chat with a local model through ragspec: drafts from the prompt, earlier answers, the
    target's own recent predictions and, with `index` or `documents=`, the retrieved texts, all
    verified by the target in one forward per step (greedy output equals plain decoding).

    >>> chat = ChatRagSpec(max_tokens=64)            # loads nothing yet
    >>> chat.invoke("Who is Mr Darcy?").response_metadata["speculation"]["mean_acceptance_length"]
    >>> chat.invoke(question, documents=vector_store.similarity_search(question))  # any retriever
    >>> chain = chat.with_retriever(retriever)        # the same, as one LCEL runnable

    Streamed chunks carry `response_metadata["token_ids"]` and `["token_sources"]` (the drafter
    of each token, "target" for the target's own); the last chunk carries `usage_metadata`,
    `model_name`, `finish_reason` and `speculation` (mean acceptance length, draft acceptance
    rate, accepted tokens per source). No tool calling, structured output or images.
    """

    @property
    def _llm_type(self) -> str:
        return "ragspec-chat"

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                  run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        outcome = Outcome()
        pieces = list(self.run_pieces(to_chat_messages(messages), stop, kwargs, outcome))
        return self._result(pieces, outcome, kwargs)

    async def _agenerate(self, messages: list[BaseMessage], stop: list[str] | None = None,
                         run_manager: AsyncCallbackManagerForLLMRun | None = None, **kwargs: Any) -> ChatResult:
        outcome = Outcome()
        async with aclosing(self.run_pieces_async(to_chat_messages(messages), stop, kwargs, outcome)) as stream:
            pieces = [p async for p in stream]
        return self._result(pieces, outcome, kwargs)

    def _result(self, pieces, outcome: Outcome, kwargs: dict) -> ChatResult:
        result = outcome.result
        metadata = {**final_metadata(self.model_name_for(kwargs.get("model")), result),
                    "token_ids": list(result.token_ids), "token_sources": [s for p in pieces for s in p.sources]}
        message = AIMessage(content=result.text, usage_metadata=usage(result), response_metadata=metadata)
        return ChatResult(generations=[ChatGeneration(message=message)])

    def _stream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                run_manager: CallbackManagerForLLMRun | None = None, **kwargs: Any) -> Iterator[ChatGenerationChunk]:
        """One chunk per decoding step, as the loop commits it (LangChain's `stream` reports each
        chunk to the callbacks' `on_llm_new_token`), then a last chunk with the metrics."""
        outcome = Outcome()
        for piece in self.run_pieces(to_chat_messages(messages), stop, kwargs, outcome):
            yield ChatGenerationChunk(message=AIMessageChunk(content=piece.text, response_metadata=piece_metadata(piece)))
        yield self._last_chunk(outcome, kwargs)

    async def _astream(self, messages: list[BaseMessage], stop: list[str] | None = None,
                       run_manager: AsyncCallbackManagerForLLMRun | None = None,
                       **kwargs: Any) -> AsyncIterator[ChatGenerationChunk]:
        """As `_stream`, with every decoding step in a worker thread (the event loop never waits
        for a forward pass); cancelling ends the request after the step in progress."""
        outcome = Outcome()
        async with aclosing(self.run_pieces_async(to_chat_messages(messages), stop, kwargs, outcome)) as stream:
            async for piece in stream:  # closing this generator closes `stream` at once (aclosing)
                yield ChatGenerationChunk(message=AIMessageChunk(content=piece.text,
                                                                 response_metadata=piece_metadata(piece)))
        yield self._last_chunk(outcome, kwargs)

    def _last_chunk(self, outcome: Outcome, kwargs: dict) -> ChatGenerationChunk:
        result = outcome.result
        message = AIMessageChunk(content="", chunk_position="last", usage_metadata=usage(result),
                                 response_metadata=final_metadata(self.model_name_for(kwargs.get("model")), result))
        return ChatGenerationChunk(message=message)

    def with_retriever(self, retriever: Runnable) -> Runnable:
        """A runnable that retrieves documents for the question (a string, or the last human
        message) with any LangChain retriever, then answers with them as context and drafting
        scope: `chat.with_retriever(vector_store.as_retriever()).stream(question)`."""

        def question(value) -> str:
            humans = [m for m in self._convert_input(value).to_messages() if isinstance(m, HumanMessage)]
            if not humans:
                raise ValueError("with_retriever needs a question: a string or a human message")
            return message_text(humans[-1])

        def route(value):
            return self.bind(documents=retriever.invoke(question(value)))

        async def aroute(value):
            return self.bind(documents=await retriever.ainvoke(question(value)))

        return RunnableLambda(route, afunc=aroute, name="ChatRagSpecWithRetriever")
