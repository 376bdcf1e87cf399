"""Edge side of voicebus: the WebSocket gateway and the mic client (issue #5).

The mic client imports only ``schemas`` and its own modules: it runs on small
devices, with no model and no Redis client in its install path.
"""
