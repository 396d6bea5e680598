// 4. Client events between two clients, on a private and on a presence channel. alice sends
// client-typing; bob must get it (with metadata.user_id on presence); alice must not get it back.
// To know that nothing was echoed, bob answers with client-ack and alice's log is read only
// once that ack arrived (the server handled alice's event before bob could answer).
import { params, connect, subscribe, once, emit, done, run, record } from '../lib.mjs';

async function exchange(alice, bob, name) {
  const [chA] = await subscribe(alice, name);
  const [chB] = await subscribe(bob, name);
  const logA = record(chA);
  const logB = record(chB);
  const received = once(chB, 'client-typing', `client-typing on ${name}`);
  const accepted = chA.trigger('client-typing', params.payload);
  const [data, metadata] = await received;
  const acked = once(chA, 'client-ack', `client-ack on ${name}`);
  chB.trigger('client-ack', { ok: true });
  const [ack, ackMetadata] = await acked;
  return {
    channel: name, accepted, data, metadata: metadata ?? null, ack, ack_metadata: ackMetadata ?? null,
    sender_events: logA.map((e) => e.event), receiver_events: logB.map((e) => e.event),
  };
}

run(async () => {
  const alice = await connect('alice');
  const bob = await connect('bob');
  emit('private', await exchange(alice, bob, params.private_channel));
  emit('presence', await exchange(alice, bob, params.presence_channel));
  await done();
});
