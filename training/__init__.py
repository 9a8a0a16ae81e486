"""`lora-jax train`: finetuning from a config file.

`training.data` turns JSONL files into packed, shuffled batches: it loads a Hugging Face
tokenizer directory (`tokenizer.json` + `tokenizer_config.json`), renders chat
templates as transformers' `apply_chat_template` does, tokenizes text, prompt/completion
and chat examples with a loss mask, packs them into fixed-length rows and iterates over
the rows in a resumable order.
"""
