"""What the HTTP door says before and beside its routes, shared by the server's entry
(``server.py``, which must not import the web framework) and the routes (``http.py``): the paths
whose errors take OpenAI's or Anthropic's shape, the public ones, and the refusals' words."""

LOADING = "the model is loading; retry shortly (GET /health answers 200 once it is loaded)"
UNAUTHORIZED = "Incorrect or missing API key: send the header Authorization: Bearer <API_KEY> (or x-api-key: <API_KEY>)"
ANTHROPIC_PATHS = ("/v1/messages",)  # errors in Anthropic's shape
OPENAI_PATHS = ("/v1/", "/tokenize", "/detokenize", "/tokenizer_info")  # errors in OpenAI's shape (vLLM's, for the last three)
PUBLIC_PATHS = ("/", "/health")
