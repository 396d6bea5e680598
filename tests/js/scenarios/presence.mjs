// 3. Presence: alice joins, bob joins (alice sees member_added), the test queries the HTTP API,
// bob disconnects (alice sees member_removed), the test queries again.
import { params, connect, subscribe, once, emit, done, run, members, command } from '../lib.mjs';

run(async () => {
  const alice = await connect('alice');
  const [chA, membersA] = await subscribe(alice, params.channel);
  emit('alice_subscribed', members(membersA));

  const added = once(chA, 'pusher:member_added');
  const bob = await connect('bob');
  const [, membersB] = await subscribe(bob, params.channel);
  emit('bob_subscribed', members(membersB));
  emit('member_added', { member: (await added)[0], count: chA.members.count });

  await command('leave');
  const removed = once(chA, 'pusher:member_removed');
  bob.disconnect();
  emit('member_removed', { member: (await removed)[0], count: chA.members.count });
  await command('finish');
  await done();
});
