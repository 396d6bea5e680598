// 6. Laravel Echo (broadcaster "pusher" or "reverb") on top of pusher-js:
// echo.private(name).listen('.order.paid') and listen('OrderShipped') (namespaced
// App\Events\OrderShipped) get events triggered by the SDK; echo.join(room) here/joining/leaving.
import Echo from 'laravel-echo';
import { params, Pusher, emit, done, run, serverOptions, within } from '../lib.mjs';

function makeEcho(user) {
  const echo = new Echo({
    broadcaster: params.broadcaster,
    key: params.key,
    ...serverOptions,
    authEndpoint: `${params.auth}/auth?user_id=${user}`,
    Pusher,
  });
  return echo;
}

async function connected(echo) {
  const conn = echo.connector.pusher.connection;
  if (conn.state === 'connected') return;
  await within(new Promise((resolve) => conn.bind('connected', resolve)), 'Echo connection');
}

run(async () => {
  const alice = makeEcho('alice');
  const bob = makeEcho('bob');
  try {
    await Promise.all([connected(alice), connected(bob)]);

    const priv = alice.private(params.private_name);
    const subscribed = within(new Promise((resolve, reject) => {
      priv.subscribed(resolve);
      priv.error((e) => reject(new Error(`Echo channel error ${JSON.stringify(e)}`)));
    }), 'Echo private subscription');
    const paid = within(new Promise((resolve) => priv.listen('.order.paid', resolve)), '.order.paid');
    const shipped = within(new Promise((resolve) => priv.listen('OrderShipped', resolve)), 'OrderShipped');
    await subscribed;
    emit('ready', { socket_id: alice.socketId(), channel: priv.name });
    emit('listen', { paid: await paid, shipped: await shipped });

    let joining; let leaving;
    const joined = within(new Promise((resolve) => { joining = resolve; }), 'Echo joining');
    const left = within(new Promise((resolve) => { leaving = resolve; }), 'Echo leaving');
    const hereA = await within(new Promise((resolve) => {
      alice.join(params.presence_name).here(resolve).joining(joining).leaving(leaving);
    }), 'Echo here (alice)');
    let roomB;
    const hereB = await within(new Promise((resolve) => {
      roomB = bob.join(params.presence_name).here(resolve);
    }), 'Echo here (bob)');
    const joiningUser = await joined;
    // whisper = client event "client-typing" on the presence channel
    const whispered = within(new Promise((resolve) => roomB.listenForWhisper('typing', resolve)),
      'listenForWhisper');
    alice.join(params.presence_name).whisper('typing', params.whisper);
    const whisper = await whispered;
    bob.leave(params.presence_name);
    const leavingUser = await left;
    emit('presence', {
      here_alice: hereA, here_bob: hereB, joining: joiningUser, leaving: leavingUser, whisper,
    });
  } finally {
    alice.disconnect();
    bob.disconnect();
  }
  await done();
});
