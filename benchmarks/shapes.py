"""The model shapes the benchmarks sweep: hidden size H and vocabulary V of real models."""

MODELS = {
    "small": (512, 32000),
    "llama3-8b": (4096, 128256),
    "qwen2.5-7b": (3584, 152064),
    "mistral-7b": (4096, 32768),
}
