"""Text helpers more than one stage uses: splitting a reply into speakable chunks
(the LLM stage streams them, the TTS stage splits long ones)."""
