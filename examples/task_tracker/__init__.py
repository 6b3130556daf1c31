"""The Task Tracker (seed 001) on taskmill and NATS JetStream: a Telegram-style webhook saves a
message, a scoring model scores it, and messages that score as signal get their knowledge
extracted; progress goes to the browser over a WebSocket. See README.md."""
