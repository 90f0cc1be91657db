"""The python files an exported Hugging Face directory ships (copied there, never imported by this project: they
import transformers)."""
