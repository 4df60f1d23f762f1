"""``WS /v1/stream``, the live streaming protocol (docs/protocol.md is its specification), by concern:

* :mod:`service.ws.protocol`: what the messages may say: control message parsing and validation,
  ``config`` applied to a session, the ``hello`` message, error and close codes;
* :mod:`service.ws.codec`: frames in and out: decoding JPEG/PNG/raw RGB24 within the size limits,
  encoding results;
* :mod:`service.ws.endpoint`: the route and one session's lifecycle: origin and key checks, the
  receive / infer / send tasks, the sending connection.
"""
