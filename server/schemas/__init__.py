"""Pydantic v2 models of the OpenAI (and vLLM tokenizer) request and response shapes,
one module per endpoint family (``chat``, ``completions``, ``models``, ``tokenize``) plus
``common``. Import from those modules; this package re-exports nothing."""
