// 9. Cache channels: subscribing to a cache channel that already had an event delivers that
// last event right after subscription_succeeded; an empty one gives pusher:cache_miss.
import { params, connect, emit, done, run, within } from '../lib.mjs';

function subscribeAndWait(client, name, until) {
  const channel = client.subscribe(name);
  const log = [];
  return within(new Promise((resolve, reject) => {
    channel.bind_global((event, data) => {
      log.push({ event, data });
      if (event === until) resolve(log);
      if (event === 'pusher:subscription_error') reject(new Error(`subscription_error ${JSON.stringify(data)}`));
    });
  }), `${until} on ${name}`);
}

run(async () => {
  const client = await connect();
  emit('cached', { log: await subscribeAndWait(client, params.channel, params.event) });
  emit('empty', { log: await subscribeAndWait(client, params.empty_channel, 'pusher:cache_miss') });
  await done();
});
