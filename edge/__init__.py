"""The edge of voicebus: what devices run, and the gateway they connect to.

Device side (the base install, no "server" extra): ``protocol`` (the WebSocket
protocol), ``auth`` (signed device tokens), ``client`` and ``audio_io`` (the mic
client: microphone, speaker, WAV streaming), ``cli_commands`` (``voicebus talk``
and ``voicebus token``). These import only the stdlib, numpy and websockets
(sounddevice lazily, for a real microphone): no model and no Redis client.

Server side: ``gateway`` (bridges device sessions onto the bus).
"""
