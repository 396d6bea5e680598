// 8. private-encrypted-: pusher-js gets shared_secret from the auth endpoint and decrypts the
// event the SDK encrypted; the raw frame on the wire must only carry nonce + ciphertext.
import { params, connect, subscribe, once, emit, done, run } from '../lib.mjs';

run(async () => {
  const client = await connect();
  const raw = [];
  client.connection.bind('message', (m) => { if (m.channel === params.channel) raw.push(m); });
  const [channel] = await subscribe(client, params.channel);
  const got = once(channel, params.event);
  emit('ready', { socket_id: client.connection.socket_id });
  const [data] = await got;
  emit('event', { data, raw: raw.filter((m) => m.event === params.event) });
  await done();
});
