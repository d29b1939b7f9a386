"""vLLM offline generation with pagedinfer's attention backend: one flag, `attention_backend="CUSTOM"`.
Needs vLLM 0.26 and pagedinfer installed side by side (`pip install "pagedinfer[vllm,cu13,demo]"`) and a GPU.

    python examples/vllm_offline.py [MODEL_DIR]      # default: SmolLM2-135M-Instruct, converted once
"""
import sys

from vllm import LLM, SamplingParams

from pagedinfer.models import smollm2_path

model = sys.argv[1] if len(sys.argv) > 1 else str(smollm2_path())
llm = LLM(model=model, attention_backend="CUSTOM", dtype="bfloat16", gpu_memory_utilization=0.3, max_model_len=4096)
questions = ["What is the capital of France?", "Name three primary colors."]
outputs = llm.chat([[{"role": "user", "content": q}] for q in questions], SamplingParams(temperature=0, max_tokens=48))
for question, output in zip(questions, outputs):
    print(f"Q: {question}\nA: {output.outputs[0].text.strip()}\n")
