// 2. Private channel: authorized subscription receives a triggered event; a subscription whose
// auth signature is wrong gets pusher:subscription_error on that channel, and the connection
// (same socket id) keeps working: a second trigger on the good channel still arrives.
import { params, connect, subscribe, once, emit, done, run, within } from '../lib.mjs';

run(async () => {
  const client = await connect();
  const socketId = client.connection.socket_id;
  const states = [];
  client.connection.bind('state_change', (s) => states.push(s.current));
  const [channel] = await subscribe(client, params.channel);
  let got = once(channel, params.event);
  emit('ready', { socket_id: socketId });
  emit('event', { n: 1, data: (await got)[0] });

  const bad = client.subscribe(params.bad_channel);
  const result = await within(new Promise((resolve) => {
    bad.bind('pusher:subscription_error', (data) => resolve({ error: data }));
    bad.bind('pusher:subscription_succeeded', () => resolve({ succeeded: true }));
    // A server that answers with a connection-level pusher:error instead (hosted Pusher and
    // Reverb do) never fires the channel's subscription_error; report that distinctly.
    client.connection.bind('error', (err) => {
      setTimeout(() => resolve({ pusher_error: err }), 500);
    });
  }), 'pusher:subscription_error');
  emit('bad_subscription', {
    ...result,
    subscribed: bad.subscribed,
    state: client.connection.state,
    socket_id: client.connection.socket_id,
  });

  got = once(channel, params.event);
  emit('ready_again', {});
  emit('event', { n: 2, data: (await got)[0] });
  await done({ state: client.connection.state, socket_id: client.connection.socket_id, states: [...states] });
});
