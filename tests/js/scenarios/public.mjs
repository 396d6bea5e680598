// 1. Public channel: subscribe, report "ready", receive the event the test triggers with the SDK.
import { params, connect, subscribe, once, emit, done, run } from '../lib.mjs';

run(async () => {
  const client = await connect();
  const [channel] = await subscribe(client, params.channel);
  const got = once(channel, params.event);
  emit('ready', { socket_id: client.connection.socket_id });
  const [data] = await got;
  emit('event', { channel: params.channel, event: params.event, data });
  await done();
});
