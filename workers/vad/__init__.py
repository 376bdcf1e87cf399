"""The VAD stage's helpers: hybrid turn detection, the transcript's verdict at a
pause, learned per-user pauses. The stage itself is ``workers.vad_worker``."""
