#!/bin/sh
# A Kafka service of docker-compose.yml (apache/kafka image), secured as `loraledger stack up`
# secures its nodes (infra/kafka/broker.py): the single node `kafka`, or one node of the
# `cluster` profile's three. Clients authenticate with SASL/SCRAM-SHA-512, the controller
# listener accepts the admin alone (SASL/PLAIN against this config; the nodes of a cluster talk
# to each other as the admin), and the StandardAuthorizer denies whatever no ACL allows. The
# admin's SCRAM credential is written when the storage is formatted; the init job creates the
# other principals and the ACLs (`loraledger stack up --external`).
#
# A cluster node sets KAFKA_NODE_ID, KAFKA_CONTROLLER_QUORUM_VOTERS (every node's
# ID@HOST:CONTROLLER_PORT), KAFKA_CLUSTER_ID (the same on every node), KAFKA_REPLICAS and
# KAFKA_MIN_INSYNC_REPLICAS; the defaults make the single node.
set -eu
: "${KAFKA_ADMIN_PASSWORD:?set KAFKA_ADMIN_PASSWORD in .env (see docker-compose.yml)}"
KAFKA_HOME=${KAFKA_HOME:-/opt/kafka}
DATA=${KAFKA_DATA:-/var/lib/kafka/data}
HOST=${KAFKA_ADVERTISED_HOST:-kafka}
PORT=${KAFKA_PORT:-9092}
CONTROLLER_PORT=$((PORT + 1))
NODE_ID=${KAFKA_NODE_ID:-1}
# A single node's controller answers itself alone, on loopback; a cluster's, the other nodes.
if [ -n "${KAFKA_CONTROLLER_QUORUM_VOTERS:-}" ]; then
  VOTERS=$KAFKA_CONTROLLER_QUORUM_VOTERS
  CONTROLLER_BIND=0.0.0.0
else
  VOTERS=$NODE_ID@127.0.0.1:$CONTROLLER_PORT
  CONTROLLER_BIND=127.0.0.1
fi
REPLICAS=${KAFKA_REPLICAS:-1}
MIN_ISR=${KAFKA_MIN_INSYNC_REPLICAS:-1}
CONFIG=/tmp/server.properties
umask 077  # the config and the admin's client config hold the password

SCRAM_LOGIN="org.apache.kafka.common.security.scram.ScramLoginModule required"
PLAIN_LOGIN="org.apache.kafka.common.security.plain.PlainLoginModule required"
ADMIN="username=\"admin\" password=\"$KAFKA_ADMIN_PASSWORD\""

cat > "$CONFIG" <<EOF
process.roles=broker,controller
node.id=$NODE_ID
controller.quorum.voters=$VOTERS
controller.listener.names=CONTROLLER
listeners=CLIENT://0.0.0.0:$PORT,CONTROLLER://$CONTROLLER_BIND:$CONTROLLER_PORT
advertised.listeners=CLIENT://$HOST:$PORT
listener.security.protocol.map=CONTROLLER:SASL_PLAINTEXT,CLIENT:SASL_PLAINTEXT
inter.broker.listener.name=CLIENT
sasl.mechanism.inter.broker.protocol=SCRAM-SHA-512
listener.name.client.sasl.enabled.mechanisms=SCRAM-SHA-512
listener.name.client.scram-sha-512.sasl.jaas.config=$SCRAM_LOGIN $ADMIN;
sasl.mechanism.controller.protocol=PLAIN
listener.name.controller.sasl.enabled.mechanisms=PLAIN
listener.name.controller.plain.sasl.jaas.config=$PLAIN_LOGIN $ADMIN user_admin="$KAFKA_ADMIN_PASSWORD";
authorizer.class.name=org.apache.kafka.metadata.authorizer.StandardAuthorizer
allow.everyone.if.no.acl.found=false
super.users=User:admin
default.replication.factor=$REPLICAS
min.insync.replicas=$MIN_ISR
offsets.topic.replication.factor=$REPLICAS
transaction.state.log.replication.factor=$REPLICAS
transaction.state.log.min.isr=$MIN_ISR
share.coordinator.state.topic.replication.factor=$REPLICAS
share.coordinator.state.topic.min.isr=$MIN_ISR
group.initial.rebalance.delay.ms=0
log.dirs=$DATA
EOF

# For the healthcheck: kafka-topics.sh --command-config /tmp/admin.properties.
cat > /tmp/admin.properties <<EOF
security.protocol=SASL_PLAINTEXT
sasl.mechanism=SCRAM-SHA-512
sasl.jaas.config=$SCRAM_LOGIN $ADMIN;
EOF

if [ ! -f "$DATA/meta.properties" ]; then
  "$KAFKA_HOME/bin/kafka-storage.sh" format -c "$CONFIG" \
    -t "${KAFKA_CLUSTER_ID:-$("$KAFKA_HOME/bin/kafka-storage.sh" random-uuid)}" \
    --add-scram "SCRAM-SHA-512=[name=admin,password=$KAFKA_ADMIN_PASSWORD]"
fi
exec "$KAFKA_HOME/bin/kafka-server-start.sh" "$CONFIG"
