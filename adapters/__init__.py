"""Engine adapters: vLLM (`pagedinfer.adapters.vllm`) and SGLang (`pagedinfer.adapters.sglang`)."""
