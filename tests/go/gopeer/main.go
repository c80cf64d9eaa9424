// gopeer plays the Go side of the trip system against a real broker, with the Go services'
// own encoding/json and github.com/rabbitmq/amqp091-go, so payment-worker's wire format is
// checked by a peer it did not write.
//
//	gopeer trip-service -uri U
//	    reads JSON lines {"ownerId","payload","traceparent"} from stdin; for each, prints how
//	    Go's encoding/json decodes the payload into PaymentTripResponseData, then publishes
//	    the envelope to `trip` with `payment.cmd.create_session` as shared/messaging does and
//	    waits for the broker's confirm.
//	gopeer api-gateway -uri U -queue Q -n N -timeout D
//	    consumes N messages from Q (auto-ack, as the gateway does), decodes each envelope and
//	    its PaymentEventSessionCreatedData, and prints them; exits 1 on the first message the
//	    gateway could not decode, or when fewer than N arrive in time.
package main

import (
	"bufio"
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"os"
	"time"

	amqp "github.com/rabbitmq/amqp091-go"
)

// AmqpMessage is shared/contracts' envelope: Data is marshalled as standard base64.
type AmqpMessage struct {
	OwnerID string `json:"ownerId"`
	Data    []byte `json:"data"`
}

// PaymentTripResponseData is payment.cmd.create_session's payload.
type PaymentTripResponseData struct {
	TripID      string  `json:"tripID"`
	UserID      string  `json:"userID"`
	DriverID    string  `json:"driverID"`
	Amount      float64 `json:"amount"`
	Currency    string  `json:"currency"`
	PackageSlug string  `json:"packageSlug,omitempty"`
}

// PaymentEventSessionCreatedData is payment.event.session_created's payload.
type PaymentEventSessionCreatedData struct {
	TripID    string  `json:"tripID"`
	SessionID string  `json:"sessionID"`
	Amount    float64 `json:"amount"`
	Currency  string  `json:"currency"`
}

type command struct {
	OwnerID     string `json:"ownerId"`
	Payload     string `json:"payload"`
	Traceparent string `json:"traceparent"`
}

type decodedCommand struct {
	Accepted bool                    `json:"accepted"`
	Error    string                  `json:"error,omitempty"`
	Payload  PaymentTripResponseData `json:"payload"`
}

type receivedEvent struct {
	OwnerID     string                         `json:"ownerId"`
	Traceparent string                         `json:"traceparent"`
	Payload     PaymentEventSessionCreatedData `json:"payload"`
}

func main() {
	if len(os.Args) < 2 {
		fail("usage: gopeer trip-service|api-gateway [flags]")
	}
	flags := flag.NewFlagSet(os.Args[1], flag.ExitOnError)
	uri := flags.String("uri", "amqp://guest:guest@127.0.0.1:5672/", "broker URI")
	queue := flags.String("queue", "notify_payment_session_created", "queue to consume")
	count := flags.Int("n", 1, "messages to consume")
	timeout := flags.Duration("timeout", 30*time.Second, "how long to wait for them")
	_ = flags.Parse(os.Args[2:])

	conn, err := amqp.Dial(*uri)
	check(err, "dial")
	defer conn.Close()
	ch, err := conn.Channel()
	check(err, "channel")
	out := json.NewEncoder(os.Stdout)

	switch os.Args[1] {
	case "trip-service":
		check(ch.Confirm(false), "confirm.select")
		// A listener, not PublishWithDeferredConfirm: in amqp091-go 1.5 a deferred
		// confirmation is registered after the publish is sent, and a fast ack is lost.
		confirms := ch.NotifyPublish(make(chan amqp.Confirmation, 1))
		lines := bufio.NewScanner(os.Stdin)
		lines.Buffer(make([]byte, 1<<20), 1<<20)
		for lines.Scan() {
			var cmd command
			check(json.Unmarshal(lines.Bytes(), &cmd), "reading a command line")
			var decoded decodedCommand
			if err := json.Unmarshal([]byte(cmd.Payload), &decoded.Payload); err != nil {
				decoded.Error = err.Error()
			} else {
				decoded.Accepted = true
			}
			check(out.Encode(decoded), "writing")
			body, err := json.Marshal(AmqpMessage{OwnerID: cmd.OwnerID, Data: []byte(cmd.Payload)})
			check(err, "marshal")
			ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
			err = ch.PublishWithContext(ctx, "trip", "payment.cmd.create_session", false, false, amqp.Publishing{
				ContentType:  "application/json",
				DeliveryMode: amqp.Persistent,
				Headers:      amqp.Table{"traceparent": cmd.Traceparent},
				Body:         body,
			})
			cancel()
			check(err, "publish")
			select {
			case confirmed := <-confirms:
				if !confirmed.Ack {
					fail("the broker refused a command")
				}
			case <-time.After(10 * time.Second):
				fail("the broker did not confirm a command in 10 s")
			}
		}
		check(lines.Err(), "stdin")
	case "api-gateway":
		deliveries, err := ch.Consume(*queue, "", true, false, false, false, nil)
		check(err, "consume")
		deadline := time.After(*timeout)
		for i := 0; i < *count; i++ {
			select {
			case d := <-deliveries:
				var envelope AmqpMessage
				check(json.Unmarshal(d.Body, &envelope), "envelope")
				var event receivedEvent
				check(json.Unmarshal(envelope.Data, &event.Payload), "payload")
				event.OwnerID = envelope.OwnerID
				if tp, ok := d.Headers["traceparent"].(string); ok {
					event.Traceparent = tp
				}
				check(out.Encode(event), "writing")
			case <-deadline:
				fail(fmt.Sprintf("%d of %d events arrived", i, *count))
			}
		}
	default:
		fail("unknown role " + os.Args[1])
	}
}

func check(err error, what string) {
	if err != nil {
		fail(what + ": " + err.Error())
	}
}

func fail(message string) {
	fmt.Fprintln(os.Stderr, "gopeer:", message)
	os.Exit(1)
}
