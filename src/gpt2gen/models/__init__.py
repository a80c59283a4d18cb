"""Loading a model: GPT-2 from the Hub, the embedded offline model, GPT-2's reference tokenizer and configuration, the hardware it runs on. Imports nothing else of gpt2gen's but its utilities."""
