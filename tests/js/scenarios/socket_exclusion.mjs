// 7. Triggering with socket_id excludes that connection. The test triggers "excluded" with
// alice's socket id, then "marker" without; once both clients got "marker" their logs are final.
import { params, connect, subscribe, once, emit, done, run, record } from '../lib.mjs';

run(async () => {
  const alice = await connect();
  const bob = await connect();
  const [chA] = await subscribe(alice, params.channel);
  const [chB] = await subscribe(bob, params.channel);
  const logA = record(chA);
  const logB = record(chB);
  const markers = Promise.all([once(chA, 'marker', 'marker at alice'), once(chB, 'marker', 'marker at bob')]);
  emit('ready', { alice: alice.connection.socket_id, bob: bob.connection.socket_id });
  await markers;
  emit('logs', { alice: logA, bob: logB });
  await done();
});
